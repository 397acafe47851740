"""The feed-forward layers' tanh-GELU projections as one GEMM each, scoped and reversible.

Each diffusers `FeedForward` with "gelu-approximate" (Wan's, CogVideoX's, and the dual-stream
blocks' of Flux and HunyuanVideo) opens with a `GELU(approximate="tanh")` module: a Linear, whose
output (the widest activation of a block) is written, read back for the GELU and written again.
`torch._addmm_activation(bias, x, W^T, use_gelu=True)` runs the GEMM with cuBLASLt's GELU epilogue
instead, applied to the float32 accumulator before the one rounding and the one write: one
write of that activation instead of two and a read (timings in BENCHMARKS.md), eager or compiled
(inductor keeps the op as one extern call). On CUDA that op's GELU is the tanh
approximation, the stock function; on CPU it is the exact one, so the fused path runs on CUDA
only. (Flux's and HunyuanVideo's single-stream blocks apply torch's `nn.GELU` after a separate
Linear inside the block's forward; those stay as they are.)

Like the fused QK norm + RoPE (intercept.py), this goes with paro's Triton kernels
(backends.AttentionBackend.fuses): `fused_gelu_projections` puts a stand-in in place of each such module and the
stock modules back on exit. The stand-in holds the stock Linear itself, so parameter names and
the weights' storage do not change, and runs the stock module wherever the fused GEMM would not
compute what it computes (`FusedTanhGelu._fusable`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from diffusers.models.activations import GELU

FUSED_DEVICES = ("cuda",)  # where torch._addmm_activation's GELU is the tanh approximation


class FusedTanhGelu(torch.nn.Module):
    """diffusers' GELU(approximate="tanh") module as one GEMM with a GELU epilogue."""

    def __init__(self, stock: GELU):
        super().__init__()
        self.proj = stock.proj
        self._stock = (stock,)  # not a submodule: the parameters keep their one name, under proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._fusable(hidden_states):
            return self._stock[0](hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = torch._addmm_activation(self.proj.bias, flat, self.proj.weight.t(), use_gelu=True)
        return out.view(*hidden_states.shape[:-1], out.shape[-1])

    def _fusable(self, hidden_states: torch.Tensor) -> bool:
        """Whether the fused GEMM computes what the stock module would. Not with autograd or
        autocast on, a subclassed Linear (a LoRA layer adds its own term in its forward), a
        hooked one (offloading and layerwise-casting hooks, accelerate's and diffusers', replace
        its forward to move or cast the weights), weights that are not plain tensors (quantised
        ones) or not on the input's device and dtype, or no bias."""
        proj = self.proj
        weight, bias = proj.weight, proj.bias
        return (
            hidden_states.device.type in FUSED_DEVICES
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(hidden_states.device.type)
            and type(proj) is torch.nn.Linear
            and _unhooked(proj)
            and bias is not None
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in (weight, bias))
            and weight.device == hidden_states.device
            and weight.dtype == hidden_states.dtype
        )


def _unhooked(module: torch.nn.Module) -> bool:
    """No forward hooks on the module and no forward of its own (how accelerate and diffusers hook)."""
    return "forward" not in vars(module) and not module._forward_hooks and not module._forward_pre_hooks


def tanh_gelu_sites(transformer: torch.nn.Module) -> list[tuple[torch.nn.Module, str, GELU]]:
    """(parent, attribute name, module) of each tanh-GELU projection without hooks of its own
    (a stand-in would not run them)."""
    return [
        (parent, name, child)
        for parent in transformer.modules()
        for name, child in parent.named_children()
        if type(child) is GELU and child.approximate == "tanh" and _unhooked(child)
    ]


@contextlib.contextmanager
def fused_gelu_projections(transformers: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Inside the block, the transformers' tanh-GELU projections run fused (module docstring)."""
    sites = [site for transformer in transformers for site in tanh_gelu_sites(transformer)]
    try:
        for parent, name, stock in sites:
            setattr(parent, name, FusedTanhGelu(stock))
        yield
    finally:
        for parent, name, stock in sites:
            setattr(parent, name, stock)
