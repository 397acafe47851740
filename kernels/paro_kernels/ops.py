"""paro's Triton kernels as torch custom ops.

Registered through torch.library with fake implementations, so torch.compile(fullgraph=True)
traces one opaque call with a known output (no graph break) and CUDA graphs can capture it.
Importing this module registers the ops.
"""

from __future__ import annotations

import torch

from . import norm_rope as _norm_rope
from .layout import SequenceLayout
from .triton_attention import paro_attention_triton


@torch.library.custom_op("paro::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kv_index: torch.Tensor,
    kv_count: torch.Tensor,
    block: int,
    text_len: int,
    text_first: bool,
    qk: str,
    pv: str,
    scale: float,
) -> torch.Tensor:
    """kernels.triton_attention.paro_attention_triton, as an op."""
    return paro_attention_triton(
        q,
        k,
        v,
        perm=perm,
        kv_index=kv_index,
        kv_count=kv_count,
        block=block,
        layout=SequenceLayout(text_len, text_first),
        qk=qk,
        pv=pv,
        scale=scale,
    )


@attention.register_fake
def _(q, k, v, perm, kv_index, kv_count, block, text_len, text_first, qk, pv, scale):
    return torch.empty_like(q)


@torch.library.custom_op("paro::norm_rope", mutates_args=())
def norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    heads: int,
    norm: str,
    per_head: bool,
    eps: float,
    rope_start: int,
) -> torch.Tensor:
    """paro_kernels.norm_rope.norm_rope, as an op: under torch.compile it replaces the norm and RoPE
    kernels inductor would generate, which write the rotated pairs apart (stride 2)."""
    return _norm_rope.norm_rope(
        x,
        heads=heads,
        norm=norm,
        per_head=per_head,
        weight=weight,
        bias=bias,
        eps=eps,
        cos=cos,
        sin=sin,
        rope_start=rope_start,
    )


@norm_rope.register_fake
def _(x, weight, bias, cos, sin, heads, norm, per_head, eps, rope_start):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)
