"""Query/key normalisation and rotary embedding in one pass (Triton).

Between a transformer's q/k projections and its attention, diffusers runs the QK norm and RoPE
as a dozen eager elementwise kernels with float32 intermediates, and inductor, under
torch.compile, as two or three kernels that write each pair's halves apart (stride 2); timings
against this kernel in BENCHMARKS.md.
It reads each projected token row once and writes it once, with the stock arithmetic: the norm
in float32, rounded to the model's dtype (the stock norm's output), then RoPE in float32 on
interleaved pairs (x[2j], x[2j+1]), rounded again:

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
# Elements per program, at least (a row-wide norm takes a whole row), and elements per warp: the
# H100 sweep found 2048 on 2 warps within 2% of the best at Wan2.1-1.3B's and CogVideoX-5B's q
# (160-165 us a call); wider rows (Wan 14B's 40 heads: 8192) get more warps, not more registers.
TILE, PER_WARP = 2048, 1024


@triton.jit
def _norm_rope_kernel(
    x_ptr,
    out_ptr,
    w_ptr,
    b_ptr,
    cos_ptr,
    sin_ptr,
    n_rows,
    rows_per_token,
    seq_len,
    rope_start,
    eps,
    cos_row_stride,
    CHUNK: tl.constexpr,
    DIM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RMS: tl.constexpr,
    PER_HEAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """ROWS rows of CHUNK consecutive heads of one token (a row-wide norm: all of its heads) as
    a contiguous [ROWS, BLOCK_H, BLOCK_D] tile, split into the even and odd channels of each pair
    in registers: loads and stores stay contiguous and wide, and a token's cos/sin row is read
    once per chunk of heads."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)[:, None, None]
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    live = (r < n_rows) & (h < CHUNK) & (d < DIM)
    offs = r * (CHUNK * DIM) + h * DIM + d
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(tl.float32)

    # normalisation in float32, over each head (axis 2) or the whole row
    if PER_HEAD:
        n = DIM
        if not RMS:
            x = tl.where(live, x - (tl.sum(x, 2) / n)[:, :, None], 0.0)
        rstd = (1.0 / tl.sqrt(tl.sum(x * x, 2) / n + eps))[:, :, None]
        w_offs = d
    else:
        n = CHUNK * DIM
        if not RMS:
            x = tl.where(live, x - tl.sum(tl.sum(x, 2), 1)[:, None, None] / n, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(x * x, 2), 1)[:, None, None] / n + eps)
        w_offs = h * DIM + d
    y = x * rstd * tl.load(w_ptr + w_offs, mask=live, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + w_offs, mask=live, other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # the stock norm's output

    # RoPE on pairs (2j, 2j+1); tokens before rope_start read cos 1, sin 0 (and stay as normed)
    pos = (r // rows_per_token) % seq_len - rope_start  # [ROWS, 1, 1]
    rotated = (pos >= 0) & (r < n_rows) & (d < DIM)
    table = pos * cos_row_stride + d
    cos = tl.load(cos_ptr + table, mask=rotated, other=1.0).to(tl.float32)  # [ROWS, 1, BLOCK_D]
    sin = tl.load(sin_ptr + table, mask=rotated, other=0.0).to(tl.float32)
    ye, yo = tl.split(tl.reshape(y, [ROWS, BLOCK_H, BLOCK_D // 2, 2]))
    cos_e, cos_o = tl.split(tl.reshape(cos, [ROWS, 1, BLOCK_D // 2, 2]))
    sin_e, sin_o = tl.split(tl.reshape(sin, [ROWS, 1, BLOCK_D // 2, 2]))
    out = tl.reshape(tl.join(ye * cos_e - yo * sin_e, yo * cos_o + ye * sin_o), [ROWS, BLOCK_H, BLOCK_D])
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=live)


def launch_shape(heads: int, dim: int, per_head: bool, tile: int) -> tuple[int, int, int, int]:
    """(CHUNK, BLOCK_H, BLOCK_D, ROWS): heads per row (all for a row-wide norm; for a per-head
    norm the largest power of two dividing `heads` that fits the tile, so no lane is masked)
    and rows per program, about `tile` elements."""
    block_d = max(2, triton.next_power_of_2(dim))
    if per_head:
        chunk = 1
        while heads % (2 * chunk) == 0 and 2 * chunk * block_d <= tile:
            chunk *= 2
        block_h = chunk
    else:
        chunk, block_h = heads, triton.next_power_of_2(heads)
    return chunk, block_h, block_d, max(1, tile // (block_h * block_d))


def norm_rope(
    x: torch.Tensor,
    *,
    heads: int,
    norm: str,
    per_head: bool,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    rope_start: int = 0,
) -> torch.Tensor:
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
        raise ValueError(
            f"cos/sin must be ({seq_len - rope_start}, {dim}) tables, got {tuple(cos.shape)} / {tuple(sin.shape)}"
        )
    cos, sin = (t.reshape(-1, dim) for t in (cos, sin))
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("cos/sin rows must be contiguous and strided alike")
    x = x.contiguous()
    out = torch.empty_like(x)
    chunk, block_h, block_d, rows = launch_shape(heads, dim, per_head, TILE)
    n_rows = batch * seq_len * heads // chunk
    _norm_rope_kernel[(triton.cdiv(n_rows, rows),)](
        x,
        out,
        weight,
        bias if bias is not None else weight,
        cos,
        sin,
        n_rows,
        heads // chunk,
        seq_len,
        rope_start,
        eps,
        cos.stride(0),
        CHUNK=chunk,
        DIM=dim,
        ROWS=rows,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        RMS=norm == "rms",
        PER_HEAD=per_head,
        HAS_BIAS=bias is not None,
        num_warps=min(16, max(2, rows * block_h * block_d // PER_WARP)),
    )
    return out
