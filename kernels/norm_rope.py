"""Query/key normalisation and rotary embedding in one pass (Triton).

Between a transformer's q/k projections and its attention, diffusers runs the QK norm and RoPE
as a dozen eager elementwise kernels with float32 intermediates; fusing them took 73 ms off an
eager Wan2.1-1.3B step and 255 ms off a CogVideoX-5B one on the H100 (BENCHMARKS.md), a tenth
and a fifth of those steps once attention is sparse. This kernel reads each projected token
row once and writes it once, with the stock arithmetic: the norm in float32, rounded to the
model's dtype (the stock norm's output), then RoPE in float32 on interleaved pairs
(x[2j], x[2j+1]), rounded again:

    out[2j]   = x[2j] cos[2j]     - x[2j+1] sin[2j]
    out[2j+1] = x[2j+1] cos[2j+1] + x[2j] sin[2j+1]

which is both Wan's (cos[0::2], sin[1::2] of pair-duplicated tables) and diffusers'
`apply_rotary_emb(use_real_unbind_dim=-1)` (CogVideoX, Flux, HunyuanVideo) on their tables.

The norm is RMS or layer norm, over the whole row (Wan: one RMSNorm over all heads) or per head
(CogVideoX: LayerNorm(head_dim)); RoPE applies to the tokens from `rope_start` on (CogVideoX's
text prefix has none).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NORMS = ("rms", "layer")


@triton.jit
def _norm_rope_kernel(x_ptr, out_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, seq_len, rope_start, eps, cos_row_stride,
                      HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr, RMS: tl.constexpr,
                      PER_HEAD: tl.constexpr, HAS_BIAS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one token of one batch element
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_J)[None, :]
    live = (h < HEADS) & (j < HALF)
    even = row * (HEADS * 2 * HALF) + h * (2 * HALF) + 2 * j
    xe = tl.load(x_ptr + even, mask=live, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + even + 1, mask=live, other=0.0).to(tl.float32)

    # normalisation, in float32, over a head (axis 1) or the whole row
    n = 2 * HALF if PER_HEAD else 2 * HALF * HEADS
    if not RMS:
        if PER_HEAD:
            mean = (tl.sum(xe, 1) + tl.sum(xo, 1))[:, None] / n
        else:
            mean = tl.sum(tl.sum(xe, 1) + tl.sum(xo, 1), 0) / n
        xe = tl.where(live, xe - mean, 0.0)
        xo = tl.where(live, xo - mean, 0.0)
    if PER_HEAD:
        var = (tl.sum(xe * xe, 1) + tl.sum(xo * xo, 1))[:, None] / n
    else:
        var = tl.sum(tl.sum(xe * xe, 1) + tl.sum(xo * xo, 1), 0) / n
    rstd = 1.0 / tl.sqrt(var + eps)
    w_even = 2 * j if PER_HEAD else h * (2 * HALF) + 2 * j
    ye = xe * rstd * tl.load(w_ptr + w_even, mask=live, other=0.0).to(tl.float32)
    yo = xo * rstd * tl.load(w_ptr + w_even + 1, mask=live, other=0.0).to(tl.float32)
    if HAS_BIAS:
        ye += tl.load(b_ptr + w_even, mask=live, other=0.0).to(tl.float32)
        yo += tl.load(b_ptr + w_even + 1, mask=live, other=0.0).to(tl.float32)
    ye = ye.to(out_ptr.dtype.element_ty).to(tl.float32)  # the stock norm's output
    yo = yo.to(out_ptr.dtype.element_ty).to(tl.float32)

    # RoPE; tokens before rope_start read cos 1, sin 0 (and stay as normed)
    pos = (row % seq_len) - rope_start
    rotated = live & (j * 0 + pos >= 0)  # pos >= 0, as a block
    table = pos * cos_row_stride + 2 * j
    cos_e = tl.load(cos_ptr + table, mask=rotated, other=1.0).to(tl.float32)
    cos_o = tl.load(cos_ptr + table + 1, mask=rotated, other=1.0).to(tl.float32)
    sin_e = tl.load(sin_ptr + table, mask=rotated, other=0.0).to(tl.float32)
    sin_o = tl.load(sin_ptr + table + 1, mask=rotated, other=0.0).to(tl.float32)
    tl.store(out_ptr + even, (ye * cos_e - yo * sin_e).to(out_ptr.dtype.element_ty), mask=live)
    tl.store(out_ptr + even + 1, (yo * cos_o + ye * sin_o).to(out_ptr.dtype.element_ty), mask=live)


def norm_rope(x: torch.Tensor, *, heads: int, norm: str, per_head: bool, weight: torch.Tensor, bias: torch.Tensor | None,
              eps: float, cos: torch.Tensor | None, sin: torch.Tensor | None, rope_start: int = 0) -> torch.Tensor:
    """Normalised and rotated copy of projected queries or keys x (B, S, heads * D).

    weight / bias: the norm's affine parameters, (heads * D) for a row norm, (D) per head.
    cos / sin: tables (S - rope_start, D), used in float32, one row per rotated token, each row's D
    values contiguous (Wan's come as (1, S, 1, D)); None: no RoPE (CogVideoX-2B), the norm alone.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    batch, seq_len, channels = x.shape
    dim = channels // heads
    if dim * heads != channels or dim % 2:
        raise ValueError(f"rows of {channels} are not {heads} heads of an even dim")
    if cos is None:  # no rotated token: one dummy row the kernel never reads
        rope_start = seq_len
        cos = sin = torch.zeros(1, dim, device=x.device)
    elif cos.reshape(-1, dim).shape != (seq_len - rope_start, dim) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be ({seq_len - rope_start}, {dim}) tables, got {tuple(cos.shape)} / {tuple(sin.shape)}")
    cos, sin = (t.reshape(-1, dim) for t in (cos, sin))
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("cos/sin rows must be contiguous and strided alike")
    x = x.contiguous()
    out = torch.empty_like(x)
    block_h, block_j = triton.next_power_of_2(heads), triton.next_power_of_2(dim // 2)
    warps = max(4, min(16, block_h * block_j // 512))  # 4 at Wan2.1-1.3B's and CogVideoX's rows (measured); more for wider ones
    _norm_rope_kernel[(batch * seq_len,)](
        x, out, weight, bias if bias is not None else weight, cos, sin, seq_len, rope_start, eps, cos.stride(0),
        HEADS=heads, HALF=dim // 2, BLOCK_H=block_h, BLOCK_J=block_j, RMS=norm == "rms", PER_HEAD=per_head,
        HAS_BIAS=bias is not None, num_warps=warps,
    )
    return out
