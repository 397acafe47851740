"""Reaching a diffusers transformer's self-attention calls, scoped and reversible.

Following diffusers' own seams: each self-attention layer's stock processor is wrapped (through
the public `set_attn_processor`) so that it marks "layer i is running"; the module-level name
through which the processors call attention is rebound to a function that hands marked
self-attention calls to a handler and forwards everything else (cross-attention, image
branches) untouched; a forward pre-hook reads the token grid, the text layout and the timestep.
Leaving the context restores all three.

Two call sites exist (each adapter names its family's: TransformerAdapter.call_site, models/base.py):
- "dispatch": `dispatch_attention_fn(query, key, value, ...)` on (B, S, H, D) tensors, in the
  transformer's own module (Wan, Flux, HunyuanVideo);
- "sdpa": `F.scaled_dot_product_attention(query, key, value, ...)` on (B, H, S, D) tensors,
  inside diffusers' legacy attention processors (CogVideoX); `F` is rebound to a stand-in for
  torch.nn.functional that differs only in that function.
Handlers always see (B, S, H, D).

Several transformers of one family may be intercepted at once (Wan 2.2's two experts): the call
site is then shared (`_ROUTES`), and each call goes to the interceptor of the transformer whose
forward is running (`_RUNNING`). `routed` installs one per component of a model.

Under diffusers' context parallelism (parallel.py) the call site receives this rank's sequence
shard; `_ulysses` hands it to diffusers' Ulysses all-to-all, and the handler sees this rank's
heads over the whole sequence.

With `fuse_norm_rope`, the marked layers run the adapter's fused processor where the family has
one (the stock processor with its QK norm and RoPE as one Triton kernel, models/*.py) instead of
the stock one: the same attention call, less work around it (eager or compiled).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from paro_kernels.layout import SequenceLayout

from .errors import PlanError
from .models.fused_gelu import fused_gelu_projections
from .parallel import gathered_order, ulysses_degree

DenseFn = Callable[[], torch.Tensor]


class AttentionHandler(Protocol):
    def on_forward(self, grid: tuple[int, int, int], layout: SequenceLayout, t: float) -> None:
        """Called before each transformer forward with its token grid, where its text tokens sit
        in self-attention and its normalised timestep."""

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: DenseFn, layout: SequenceLayout
    ) -> torch.Tensor:
        """Self-attention of `layer` on (B, S, H, D) tensors laid out as `layout` (the forward's, or
        a batch element's text without its padding); `dense()` runs the stock call."""


class StockAttention:
    """Handler that runs every call's stock attention (e.g. to time the fused processors alone)."""

    def on_forward(self, grid, layout, t) -> None:
        pass

    def attention(self, layer, q, k, v, dense: DenseFn, layout) -> torch.Tensor:
        return dense()


class _State:
    layer: int | None = None


class _LayerMarker:
    """Runs the stock processor with `state.layer` set, so the call site knows which layer calls."""

    def __init__(self, stock, layer: int, state: _State):
        self.stock = stock
        self.layer = layer
        self.state = state

    def _run(self, attn, *args, **kwargs):
        self.state.layer = self.layer
        try:
            return self.stock(attn, *args, **kwargs)
        finally:
            self.state.layer = None


@functools.cache
def _marker_class(stock_class: type) -> type:
    """A _LayerMarker whose __call__ has the stock processor's signature: diffusers' legacy
    Attention passes a processor only the keyword arguments its signature names, and would drop
    e.g. CogVideoX's `image_rotary_emb` for a plain (*args, **kwargs)."""

    @functools.wraps(stock_class.__call__)
    def __call__(self, attn, *args, **kwargs):
        return self._run(attn, *args, **kwargs)

    return type(f"Marked{stock_class.__name__}", (_LayerMarker,), {"__call__": __call__})


class AttentionInterceptor:
    """Context manager routing a transformer's self-attention calls to `handler`."""

    def __init__(self, transformer: torch.nn.Module, adapter, handler: AttentionHandler, fuse_norm_rope: bool = False):
        self.transformer = transformer
        self.adapter = adapter
        self.handler = handler
        self.fuse_norm_rope = fuse_norm_rope
        self.state = _State()

    def __enter__(self) -> AttentionInterceptor:
        module, name = self.adapter.call_site
        self.route = (id(module), name)
        active = _ROUTES.setdefault(self.route, [])
        if any(i.transformer is self.transformer for i in active):
            raise PlanError(
                "paro is already applied to this transformer (a plan or a calibration)",
                "remove() the applied plan first",
            )
        self.stock = dict(self.transformer.attn_processors)
        processors = dict(self.stock)
        fused = self.fuse_norm_rope and self.adapter.norm_rope_processor
        for i, key in enumerate(self.adapter.attention_layers(self.transformer)):
            stock = self.stock[key]
            processor = (
                fused(stock) if fused and type(stock).__name__ == fused.replaces else stock
            )  # never over a custom one
            processors[key] = _marker_class(type(processor))(processor, i, self.state)
        self.transformer.set_attn_processor(processors)
        if active:  # another transformer of the family (Wan 2.2's second) holds the call site
            self.original = active[0].original
        else:
            self.original = getattr(module, name)
            sdpa = name != "dispatch_attention_fn"
            setattr(module, name, _functional_with(_router(self.route, sdpa)) if sdpa else _router(self.route, sdpa))
        active.append(self)
        self.hook = self.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()
        active = _ROUTES[self.route]
        active.remove(self)
        if _RUNNING.get(self.route) is self:
            del _RUNNING[self.route]
        if not active:
            module, name = self.adapter.call_site
            setattr(module, name, self.original)
            del _ROUTES[self.route]
        self.transformer.set_attn_processor(self.stock)

    def _pre_hook(self, module, args, kwargs):
        _RUNNING[self.route] = self
        self.layout = self.adapter.sequence_layout(args, kwargs)
        self.text_lengths = self.adapter.valid_text_lengths(args, kwargs)
        self.handler.on_forward(
            self.adapter.token_grid(module, args, kwargs), self.layout, self.adapter.normalised_timestep(args, kwargs)
        )

    def _take_layer(self, query, key, attn_mask) -> int | None:
        """The marked layer if this is its self-attention call (each marked invocation makes one).
        A mask is only taken where the forward's text is padded (the adapter's
        `valid_text_lengths`): then it is that padding, and `_dispatch` removes it."""
        layer = self.state.layer
        if layer is None or key.shape != query.shape or (attn_mask is not None and self.text_lengths is None):
            return None
        self.state.layer = None
        return layer

    def _dispatch(self, query, key, value, *args, **kwargs):
        def dense() -> torch.Tensor:
            return self.original(query, key, value, *args, **kwargs)

        layer = self._take_layer(query, key, kwargs.get("attn_mask"))
        if layer is None:
            return dense()

        def attend(q, k, v) -> torch.Tensor:  # the stock call on a whole, unpadded sequence
            return self.original(q, k, v, *args, **{**kwargs, "attn_mask": None, "parallel_config": None})

        if kwargs.get("parallel_config") is not None:
            return self._ulysses(layer, query, key, value, attend, kwargs["parallel_config"], kwargs.get("scale"))
        return self._attend(layer, query, key, value, attend)

    def _attend(self, layer, query, key, value, attend) -> torch.Tensor:
        """The handler on a whole sequence in the forward's layout; `attend(q, k, v)` is the stock call."""
        if self.text_lengths is None:
            return self.handler.attention(layer, query, key, value, lambda: attend(query, key, value), self.layout)
        return self._unpadded(layer, query, key, value, attend)

    def _gathered(self, layer, query, key, value, attend, degree: int) -> torch.Tensor:
        """`_attend` on a sequence as diffusers' Ulysses all-to-all gathers it from `degree` ranks:
        put in the layout's order first (parallel.gathered_order), and back after."""
        if degree == 1 or not self.layout.text_len:  # one rank, or visual tokens alone: already in order
            return self._attend(layer, query, key, value, attend)
        order, inverse = gathered_order(
            self.layout.text_len, query.shape[1], degree, self.layout.text_first, query.device
        )
        return self._attend(layer, *(x[:, order] for x in (query, key, value)), attend)[:, inverse]

    def _ulysses(self, layer, query, key, value, attend, config, scale) -> torch.Tensor:
        """A call under diffusers' context parallelism, on this rank's sequence shard: diffusers'
        own Ulysses all-to-all gives the handler this rank's heads over the whole sequence and takes
        the output back to the shard. A padded text's mask is not passed along: `_unpadded` drops
        the padding from the whole sequence instead."""
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        degree = config.context_parallel_config.ulysses_degree
        return _templated_context_parallel_attention(
            query,
            key,
            value,
            None,
            0.0,
            False,
            scale,
            False,
            False,
            forward_op=lambda ctx, q, k, v, *unused, **unused_kwargs: self._gathered(layer, q, k, v, attend, degree),
            backward_op=None,
            _parallel_config=config,
        )

    def _unpadded(self, layer, query, key, value, attend) -> torch.Tensor:
        """A call whose text (after the video) is padded, per batch element: the video and its
        real text tokens go to the handler; the padding's query rows attend, as the stock masked
        call has them, to the real keys (a dense call of at most the text's length)."""
        text, n = self.layout.text_len, query.shape[1] - self.layout.text_len
        out = torch.empty_like(query)
        for b, length in enumerate(self.text_lengths):
            real = slice(0, n + length)
            q, k, v = (x[b : b + 1, real] for x in (query, key, value))
            out[b : b + 1, real] = self.handler.attention(
                layer, q, k, v, lambda q=q, k=k, v=v: attend(q, k, v), SequenceLayout(length, text_first=False)
            )
            if length < text:
                out[b : b + 1, n + length :] = attend(query[b : b + 1, n + length :], k, v)
        return out

    def _sdpa(self, query, key, value, attn_mask=None, *args, **kwargs):
        """A legacy processor's call (CogVideoX) on (B, H, S, D). Under Ulysses the processor
        (models/cogvideox.py) calls it inside diffusers' all-to-all: on the gathered sequence."""
        stock = self.original.scaled_dot_product_attention
        layer = self._take_layer(query, key, attn_mask)
        if layer is None:
            return stock(query, key, value, attn_mask, *args, **kwargs)

        def attend(q, k, v) -> torch.Tensor:
            return stock(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask, *args, **kwargs).transpose(1, 2)

        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return self._gathered(layer, q, k, v, attend, ulysses_degree(self.transformer)).transpose(1, 2)


# Call site (id(module), name) -> the interceptors installed on it, in order, and the one whose
# transformer's forward runs now (set by its pre-hook). Transformers of one family call attention
# through the same module-level name; the running one owns the calls. A module-level dict, not
# state on the processors: torch.compile guards on it, so a compiled forward traced for one
# expert is not reused for the other (both are the same class and code).
_ROUTES: dict[tuple[int, str], list[AttentionInterceptor]] = {}
_RUNNING: dict[tuple[int, str], AttentionInterceptor] = {}


def _router(route: tuple[int, str], sdpa: bool) -> Callable:
    """The function installed at a call site: hands a call to the running transformer's
    interceptor when one of its marked layers makes it, anything else to the stock function."""

    def route_call(*args, **kwargs):
        interceptor = _RUNNING.get(route)
        if interceptor is not None and interceptor.state.layer is not None:
            return (interceptor._sdpa if sdpa else interceptor._dispatch)(*args, **kwargs)
        original = _ROUTES[route][0].original
        return (original.scaled_dot_product_attention if sdpa else original)(*args, **kwargs)

    return route_call


@contextlib.contextmanager
def routed(components: dict[str, torch.nn.Module], adapter, handlers: dict, fuse: bool = False) -> Iterator[None]:
    """Each transformer's self-attention routed to its handler (Wan 2.2 has two transformers),
    with paro's fusions around attention too when `fuse` (a backend's `fuses`): the adapter's
    fused QK norm + RoPE processor and the feed-forward's fused tanh-GELU projections."""
    with contextlib.ExitStack() as stack:
        if fuse:
            stack.enter_context(fused_gelu_projections(components.values()))
        for name, transformer in components.items():
            stack.enter_context(AttentionInterceptor(transformer, adapter, handlers[name], fuse_norm_rope=fuse))
        yield


def _functional_with(sdpa) -> types.ModuleType:
    """A module with torch.nn.functional's names and `sdpa` as scaled_dot_product_attention (a
    module, not an object with __getattr__, so that torch.compile reads it as it reads F)."""
    module = types.ModuleType("torch.nn.functional, paro's scaled_dot_product_attention")
    module.__dict__.update({k: v for k, v in vars(torch.nn.functional).items() if not k.startswith("__")})
    module.scaled_dot_product_attention = sdpa
    return module
