"""PAROAttention forward in Triton: reordered, block-sparse, optionally quantised.

Semantics are kernels/reference.py's; this file is about doing it fast on a GPU.

- One program computes one tile of `BLOCK` query rows of one (batch, head), in paro order
  (text tiles first, then visual tiles in the head's token order). Text query tiles attend to
  every key tile; a visual query tile attends to every text key tile and to the visual key
  tiles listed for it in `kv_index[h, i, :kv_count[h, i]]` (a compact list: no scan of a
  dense block grid).
- The head's order is fused into memory access: rows are fetched through `perm` (a gather
  in the loads) and the output is written back through `perm` (the inverse, in the store).
  No separate permute pass exists.
- Float modes (Q/K/V in the model's bf16/fp16) read the caller's (B, S, H, D) tensors
  directly. 8-bit modes first run `_prep_kernel`, ONE fused pass that gathers each tile in
  paro order, removes K's and V's means, quantises Q and K with one scale per tile and V with
  one scale per channel, and writes contiguous paro-order buffers the attention kernel streams.
- Online softmax in base 2 (log2(e) folded into the score scale), fp32 statistics m_i, l_i and
  fp32 accumulator acc. P = exp2(s - m_i) lies in [0, 1]: FP8 e4m3 holds 448 p (a static
  scale that keeps small probabilities out of e4m3's subnormals), INT8 holds round(127 p).
  l_i sums P before rounding, as the reference does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import SequenceLayout, num_blocks
from .quant import MIN_AMAX, QMAX, is_scaled

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Format codes shared by host and kernels.
FLOAT, INT, FP8 = 0, 1, 2
PV_INT8 = 3


def format_code(fmt: str) -> int:
    return {"int8": INT, "int4": INT, "fp8": FP8}.get(fmt, FLOAT)


@triton.jit
def _rint(x):
    """Round half to even in fp32 (as torch.round) for |x| < 2**22: adding 1.5 * 2**23 leaves no
    fraction bits, so the FPU rounds for us."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _row_mask(valid, d, DIM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Load/store mask of a tile: its valid rows, and the real channels when the head dim was
    padded to a power of two (nothing to mask, hence nothing computed, when it was not)."""
    if DIM == HEAD_DIM:  # broadcast only: the mask stays constant along channels, loads stay wide
        mask = tl.broadcast_to(valid[:, None], (valid.shape[0], HEAD_DIM))
    else:
        mask = valid[:, None] & (d[None, :] < DIM)
    return mask


@triton.jit
def _rows(tile, n_text_tiles, T, N, perm_h, offs, text_base, vis_base, BLOCK: tl.constexpr, GATHER: tl.constexpr):
    """Row indices of one tile of the paro-order sequence.

    Returns (rows to read in the source tensor, rows of the original sequence, valid mask).
    Text tiles cover [0, T), visual tiles cover the head's order of [0, N); tiles of a segment
    start at the segment's first token, so the last tile of each may be ragged.
    """
    is_text = tile < n_text_tiles
    pos = tl.where(is_text, tile, tile - n_text_tiles) * BLOCK + offs
    valid = pos < tl.where(is_text, T, N)
    token = tl.load(perm_h + tl.where(valid & (tile >= n_text_tiles), pos, 0))  # N >= 1: index 0 exists
    original = tl.where(is_text, text_base + pos, vis_base + token)
    if GATHER:
        source = original
    else:  # prepped buffers hold text first, then visual tokens in paro order
        source = tl.where(is_text, pos, T + pos)
    return source, original, valid


@triton.jit
def _attend_tile(acc, l_i, m_i, q, score_scale, k_ptr, v_ptr, rows, valid, d,
                 stride_ks, stride_kd, stride_vs, stride_vd,
                 QK: tl.constexpr, PV: tl.constexpr, UPCAST: tl.constexpr, DIM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One online-softmax step over a key tile: the body shared by text and visual key tiles."""
    mask = _row_mask(valid, d, DIM, HEAD_DIM)
    k = tl.load(k_ptr + rows[:, None] * stride_ks + d[None, :] * stride_kd, mask=mask, other=0.0)
    if UPCAST and QK == 0:  # the CPU interpreter multiplies raw bits in 16-bit dots
        k = k.to(tl.float32)
    if QK == 1:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid[None, :], s * score_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + rows[:, None] * stride_vs + d[None, :] * stride_vd, mask=mask, other=0.0)
    if PV == 2:  # P * 448 uses e4m3's whole range: small probabilities stay normal numbers
        pv = tl.dot((p * 448.0).to(tl.float8e4nv), v) * (1.0 / 448.0)
    elif PV == 3:
        pv = tl.dot(_rint(p * 127.0).to(tl.int8), v, out_dtype=tl.int32).to(tl.float32) * (1.0 / 127.0)
    elif UPCAST:  # round P to V's 16-bit type as the GPU path does, then multiply in fp32
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


@triton.jit
def _paro_attention_kernel(
    Q, K, V, Out, Perm, KvIndex, KvCount, QScale, KScale, VScale, VMean,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    H, T, N, n_text_tiles, nb, score_scale, text_first,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, DIM: tl.constexpr, GATHER: tl.constexpr,
    QK: tl.constexpr, PV: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_tiles = n_text_tiles + nb
    offs = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    perm_h = Perm + h.to(tl.int64) * N
    text_base = (1 - text_first) * N  # original position of the first text / visual token
    vis_base = text_first * T
    src_text = text_base if GATHER else 0
    src_vis = vis_base if GATHER else T

    # int64 offsets: B*S*H*D exceeds 2**31 at real sizes.
    q_ptr = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_ptr = K + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    v_ptr = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    rows, original, valid = _rows(tile, n_text_tiles, T, N, perm_h, offs, text_base, vis_base, BLOCK, GATHER)
    q = tl.load(q_ptr + rows[:, None] * stride_qs + d[None, :] * stride_qd, mask=_row_mask(valid, d, DIM, HEAD_DIM), other=0.0)
    if UPCAST and QK == 0:
        q = q.to(tl.float32)
    if QK != 0:
        q_scale = tl.load(QScale + bh.to(tl.int64) * n_tiles + tile)
        score_scale = score_scale * q_scale

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)

    for t in range(0, n_text_tiles):
        k_rows, _, k_valid = _rows(t, n_text_tiles, T, N, perm_h, offs, text_base, vis_base, BLOCK, GATHER)
        scale = score_scale
        if QK != 0:
            scale = scale * tl.load(KScale + bh.to(tl.int64) * n_tiles + t)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, scale, k_ptr, v_ptr, k_rows, k_valid, d,
                                     stride_qs, stride_qd, stride_vs, stride_vd, QK, PV, UPCAST, DIM, HEAD_DIM)

    is_text = tile < n_text_tiles
    vis_tile = tl.where(is_text, 0, tile - n_text_tiles)
    list_ptr = KvIndex + (h.to(tl.int64) * nb + vis_tile) * nb
    n_kv = tl.where(is_text, nb, tl.load(KvCount + h.to(tl.int64) * nb + vis_tile))
    for j in range(0, n_kv):
        kt = tl.where(is_text, j, tl.load(list_ptr + j))
        k_rows, _, k_valid = _rows(n_text_tiles + kt, n_text_tiles, T, N, perm_h, offs, text_base, vis_base, BLOCK, GATHER)
        scale = score_scale
        if QK != 0:
            scale = scale * tl.load(KScale + bh.to(tl.int64) * n_tiles + n_text_tiles + kt)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, scale, k_ptr, v_ptr, k_rows, k_valid, d,
                                     stride_qs, stride_qd, stride_vs, stride_vd, QK, PV, UPCAST, DIM, HEAD_DIM)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if PV != 0:  # undo V's per-channel scale, add back the mean the prep pass removed
        v_scale = tl.load(VScale + bh.to(tl.int64) * DIM + d, mask=d < DIM, other=0.0)
        v_mean = tl.load(VMean + bh.to(tl.int64) * DIM + d, mask=d < DIM, other=0.0)
        out = out * v_scale[None, :] + v_mean[None, :]
    o_ptr = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_ptr + original[:, None].to(tl.int64) * stride_os + d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=_row_mask(valid, d, DIM, HEAD_DIM))


@triton.jit
def _quantise_tile(x, FMT: tl.constexpr, QMAX_: tl.constexpr, MIN_AMAX_: tl.constexpr):
    """(codes, scale) of one tile: one scale for the tile (INT/FP8) or none (FLOAT)."""
    if FMT == 0:
        return x, 1.0
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), MIN_AMAX_) / QMAX_
    y = x / scale
    if FMT == 1:
        y = tl.minimum(tl.maximum(_rint(y), -QMAX_), QMAX_)
    else:
        y = tl.minimum(tl.maximum(y, -QMAX_), QMAX_)
    return y, scale


@triton.jit
def _prep_kernel(
    Q, K, V, Perm, KMean, VMean, VScale, Qp, Kp, Vp, QScale, KScale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_vpb, stride_vph, stride_vps, stride_vpd,
    H, T, N, n_text_tiles, nb, text_first,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, DIM: tl.constexpr,
    QK: tl.constexpr, QK_QMAX: tl.constexpr, PV: tl.constexpr, PV_QMAX: tl.constexpr, MIN_AMAX_: tl.constexpr,
):
    """One fused pass: gather a tile in paro order, remove K's and V's means, quantise Q/K per
    tile and V per channel, write contiguous paro-order buffers (V transposed when 8-bit, as FP8/INT8 tensor
    core products want their second operand K-major)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    perm_h = Perm + h.to(tl.int64) * N
    rows, original, valid = _rows(tile, n_text_tiles, T, N, perm_h, offs, (1 - text_first) * N, text_first * T, BLOCK, True)
    buf_rows, _, _ = _rows(tile, n_text_tiles, T, N, perm_h, offs, 0, 0, BLOCK, False)
    src = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None].to(tl.int64) * stride_qs + d[None, :] * stride_qd
    dst = b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + buf_rows[:, None].to(tl.int64) * stride_ps + d[None, :] * stride_pd
    vdst = b.to(tl.int64) * stride_vpb + h.to(tl.int64) * stride_vph + buf_rows[:, None].to(tl.int64) * stride_vps + d[None, :] * stride_vpd
    mask = _row_mask(valid, d, DIM, HEAD_DIM)
    n_tiles = n_text_tiles + nb

    q = tl.load(Q + src, mask=mask, other=0.0).to(tl.float32)
    q, q_scale = _quantise_tile(q, QK, QK_QMAX, MIN_AMAX_)
    tl.store(Qp + dst, q.to(Qp.dtype.element_ty), mask=mask)

    k = tl.load(K + src, mask=mask, other=0.0).to(tl.float32)
    if QK != 0:  # softmax ignores a shift shared by all keys; the quantiser does not
        k = tl.where(mask, k - tl.load(KMean + bh.to(tl.int64) * DIM + d, mask=d < DIM, other=0.0)[None, :], 0.0)
    k, k_scale = _quantise_tile(k, QK, QK_QMAX, MIN_AMAX_)
    tl.store(Kp + dst, k.to(Kp.dtype.element_ty), mask=mask)
    if QK != 0:
        tl.store(QScale + bh.to(tl.int64) * n_tiles + tile, q_scale)
        tl.store(KScale + bh.to(tl.int64) * n_tiles + tile, k_scale)

    v = tl.load(V + src, mask=mask, other=0.0).to(tl.float32)
    if PV != 0:
        v_mean = tl.load(VMean + bh.to(tl.int64) * DIM + d, mask=d < DIM, other=0.0)[None, :]
        v = (v - v_mean) / tl.load(VScale + bh.to(tl.int64) * DIM + d, mask=d < DIM, other=1.0)[None, :]
        v = tl.minimum(tl.maximum(v, -PV_QMAX), PV_QMAX)
        if PV == 3:
            v = _rint(v)
    tl.store(Vp + vdst, v.to(Vp.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side

STORAGE = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8, "int4": torch.int8, "fp8": torch.float8_e4m3fn}
MAX_HEAD_DIM = 128
BLOCKS = (16, 32, 64, 128)


def padded_head_dim(dim: int) -> int:
    """Tiles span a power of two >= 16 channels (tl.arange and tensor-core shapes need it)."""
    return max(16, triton.next_power_of_2(dim))


def launch_config(block: int, head_dim: int) -> dict:
    """Warps and pipeline depth per tile shape on sm_90 (see BENCHMARKS.md for the sweep):
    a 64-row tile is one warpgroup's wgmma; deeper pipelines help the narrower head dim."""
    warps = 8 if block >= 128 else 4
    stages = 3 if head_dim <= 64 else 2
    if INTERPRET:
        return {"num_warps": 1, "num_stages": 1}
    return {"num_warps": warps, "num_stages": stages}


def _check(q, k, v, perm, kv_index, kv_count, block, layout, qk, pv):
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(f"q, k, v must share one (B, S, H, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must be bf16 or fp16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 8 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} unsupported (supported: 8 to {MAX_HEAD_DIM})")
    if block not in BLOCKS:
        raise ValueError(f"block {block} unsupported (supported: {BLOCKS})")
    if qk not in ("bf16", "fp16", "int8", "int4", "fp8") or pv not in ("bf16", "fp16", "int8", "fp8"):
        raise ValueError(f"unsupported precision QK {qk} / PV {pv}")
    n = layout.visual_len(q.shape[1])
    nb = num_blocks(n, block)
    if perm.shape != (q.shape[2], n) or kv_index.shape != (q.shape[2], nb, nb) or kv_count.shape != (q.shape[2], nb):
        raise ValueError(f"perm/kv_index/kv_count shapes {tuple(perm.shape)}/{tuple(kv_index.shape)}/{tuple(kv_count.shape)} "
                         f"do not fit H={q.shape[2]}, N={n}, block={block}")
    for name, t, dtypes in (("perm", perm, (torch.int32, torch.int64)), ("kv_index", kv_index, (torch.int32,)),
                            ("kv_count", kv_count, (torch.int32,))):
        if t.dtype not in dtypes or t.device != q.device or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {' or '.join(map(str, dtypes))} tensor on {q.device}")


def paro_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    perm: torch.Tensor,
    kv_index: torch.Tensor,
    kv_count: torch.Tensor,
    block: int,
    layout: SequenceLayout = SequenceLayout(),
    qk: str = "bf16",
    pv: str = "bf16",
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reordered block-sparse attention; q, k, v (B, S, H, D) bf16/fp16 as diffusers passes them.

    perm (H, N) int32/int64: each head's visual order. kv_index (H, nb, nb) int32 / kv_count (H, nb)
    int32: per visual query tile, the kept visual key tiles first (see layout.kept_block_lists).
    """
    _check(q, k, v, perm, kv_index, kv_count, block, layout, qk, pv)
    bsz, seq, heads, dim = q.shape
    t = layout.text_len
    n = seq - t
    nb = num_blocks(n, block)
    n_text_tiles = num_blocks(t, block)
    n_tiles = n_text_tiles + nb
    native = {torch.bfloat16: "bf16", torch.float16: "fp16"}[q.dtype]
    gather = qk == native and pv == native
    qk_code = format_code(qk)
    pv_code = PV_INT8 if pv == "int8" else format_code(pv)
    score_scale = (dim**-0.5 if scale is None else scale) * LOG2E
    upcast = INTERPRET
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}")
    config = launch_config(block, dim)
    grid = (n_tiles, bsz * heads)
    dummy = torch.empty(1, device=q.device, dtype=torch.float32)

    if gather:
        sq = q.stride()
        qs, ks, vs = q, k, v
        q_scale = k_scale = v_scale = v_mean = dummy
        sqb, sqh, sqs, sqd = sq[0], sq[2], sq[1], sq[3]
        svb, svh, svs, svd = sqb, sqh, sqs, sqd
    else:
        qs, ks, vs, q_scale, k_scale, v_scale, v_mean = prepare(q, k, v, perm, block, layout, qk, pv, n_tiles, n_text_tiles, nb)
        sqb, sqh, sqs, sqd = qs.stride()
        if pv_code:  # 8-bit V is stored transposed: (B, H, D, S)
            svb, svh, svd, svs = vs.stride()
        else:
            svb, svh, svs, svd = vs.stride()
    so = out.stride()
    _paro_attention_kernel[grid](
        qs, ks, vs, out, perm, kv_index, kv_count, q_scale, k_scale, v_scale, v_mean,
        sqb, sqh, sqs, sqd, svb, svh, svs, svd, so[0], so[2], so[1], so[3],
        heads, t, n, n_text_tiles, nb, score_scale, int(layout.text_first),
        BLOCK=block, HEAD_DIM=padded_head_dim(dim), DIM=dim, GATHER=gather, QK=qk_code, PV=pv_code, UPCAST=upcast, **config,
    )
    return out


def prepare(q, k, v, perm, block, layout, qk, pv, n_tiles, n_text_tiles, nb):
    """The fused prep pass: paro-order Q/K/V buffers in the compute formats, and their scales."""
    bsz, seq, heads, dim = q.shape
    qk_code = format_code(qk)
    pv_code = PV_INT8 if pv == "int8" else format_code(pv)
    qk_storage = STORAGE[qk] if qk in STORAGE else q.dtype
    qp = torch.empty(bsz, heads, seq, dim, device=q.device, dtype=qk_storage)
    kp = torch.empty_like(qp)
    if pv_code:
        vp = torch.empty(bsz, heads, dim, seq, device=q.device, dtype=STORAGE[pv])
        svpb, svph, svpd, svps = vp.stride()
    else:
        vp = torch.empty(bsz, heads, seq, dim, device=q.device, dtype=STORAGE.get(pv, q.dtype))
        svpb, svph, svps, svpd = vp.stride()
    q_scale = torch.empty(bsz, heads, n_tiles, device=q.device, dtype=torch.float32)
    k_scale = torch.empty_like(q_scale)
    k_mean = k.float().mean(dim=1).contiguous() if is_scaled(qk) else q_scale  # (B, H, D)
    pv_qmax = QMAX["int8" if pv == "int8" else "fp8"]
    if pv_code:
        v_mean = v.float().mean(dim=1, keepdim=True)
        v_scale = ((v - v_mean).abs().amax(dim=1).float().clamp_min(MIN_AMAX) / pv_qmax).contiguous()
        v_mean = v_mean[:, 0].contiguous()
    else:
        v_mean = v_scale = q_scale
    sq = q.stride()
    _prep_kernel[(n_tiles, bsz * heads)](
        q, k, v, perm, k_mean, v_mean, v_scale, qp, kp, vp, q_scale, k_scale,
        sq[0], sq[1], sq[2], sq[3], *qp.stride(), svpb, svph, svps, svpd,
        heads, layout.text_len, seq - layout.text_len, n_text_tiles, nb, int(layout.text_first),
        BLOCK=block, HEAD_DIM=padded_head_dim(dim), DIM=dim, QK=qk_code, QK_QMAX=QMAX.get(qk, 1.0), PV=pv_code, PV_QMAX=pv_qmax, MIN_AMAX_=MIN_AMAX,
        **launch_config(block, dim),
    )
    return qp, kp, vp, q_scale, k_scale, v_scale, v_mean
