"""Reaching a diffusers transformer's self-attention calls, scoped and reversible.

Following diffusers' own seams: each self-attention layer's stock processor is wrapped (through
the public `set_attn_processor`) so that it marks "layer i is running"; the model module's
`dispatch_attention_fn` name is rebound to a function that hands marked self-attention calls to
a handler and forwards everything else (cross-attention, image branches) untouched; a forward
pre-hook reads the token grid and timestep. Leaving the context restores all three.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

DenseFn = Callable[[], torch.Tensor]


class AttentionHandler(Protocol):
    def on_forward(self, grid: tuple[int, int, int], t: float) -> None:
        """Called before each transformer forward with its token grid and normalised timestep."""

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: DenseFn) -> torch.Tensor:
        """Self-attention of `layer` on (B, S, H, D) tensors; `dense()` runs the stock call."""


class _LayerMarker:
    """Runs the stock processor with `state.layer` set, so the dispatch knows which layer calls."""

    def __init__(self, stock, layer: int, state: "_State"):
        self.stock = stock
        self.layer = layer
        self.state = state

    def __call__(self, attn, *args, **kwargs):
        self.state.layer = self.layer
        try:
            return self.stock(attn, *args, **kwargs)
        finally:
            self.state.layer = None


class _State:
    layer: int | None = None


class AttentionInterceptor:
    """Context manager routing a transformer's self-attention calls to `handler`."""

    def __init__(self, transformer: torch.nn.Module, adapter, handler: AttentionHandler):
        self.transformer = transformer
        self.adapter = adapter
        self.handler = handler
        self.state = _State()

    def __enter__(self) -> "AttentionInterceptor":
        module = self.adapter.dispatch_module
        self.original = module.dispatch_attention_fn
        if isinstance(getattr(self.original, "__self__", None), AttentionInterceptor):
            raise RuntimeError("paro attention is already installed on this model family; nest nothing")
        self.stock = dict(self.transformer.attn_processors)
        processors = dict(self.stock)
        for i, key in enumerate(self.adapter.attention_layers(self.transformer)):
            processors[key] = _LayerMarker(self.stock[key], i, self.state)
        self.transformer.set_attn_processor(processors)
        module.dispatch_attention_fn = self._dispatch
        self.hook = self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()
        self.adapter.dispatch_module.dispatch_attention_fn = self.original
        self.transformer.set_attn_processor(self.stock)

    def _pre_hook(self, module, args, kwargs):
        grid = self.adapter.token_grid(module, args, kwargs)
        self.handler.on_forward(grid, self.adapter.normalised_timestep(args, kwargs))

    def _dispatch(self, query, key, value, *args, **kwargs):
        layer = self.state.layer

        def dense() -> torch.Tensor:
            return self.original(query, key, value, *args, **kwargs)

        is_self = key.shape[1] == query.shape[1] and kwargs.get("attn_mask") is None
        if layer is None or not is_self:
            return dense()
        self.state.layer = None  # one self-attention call per marked layer invocation
        return self.handler.attention(layer, query, key, value, dense)
