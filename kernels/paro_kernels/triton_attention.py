"""PAROAttention forward in Triton: reordered, block-sparse, optionally quantised.

Semantics are kernels/paro_kernels/reference.py's; this file is about doing it fast on a GPU.

- One program computes one tile of `BLOCK` query rows of one (batch, head), in paro order
  (text tiles first, then visual tiles in the head's token order), or a half of it where
  `launch_config` splits tiles between two programs. Text query tiles attend to
  every key tile; a visual query tile attends to every text key tile and to the visual key
  tiles listed for it in `kv_index[h, i, :kv_count[h, i]]` (a compact list: no scan of a
  dense block grid).
- The head's order is fused into memory access: rows are fetched through `perm` (a gather
  in the loads) and the output is written back through `perm` (the inverse, in the store).
  No separate permute pass exists.
- Q is read from the caller's (B, S, H, D) tensor through the order, and quantised in
  registers when QK is 8-bit: divided channel by channel by the balance (quant.channel_balance),
  then one scale per 64 rows (quant.QUERY_SCALE_ROWS). K and V, read by every query tile that
  keeps them, first go through `_prep_kernel`: ONE fused pass that gathers each tile in paro
  order (and, in the 8-bit modes, removes K's and V's channel shifts, multiplies K by the
  balance, and quantises them with one scale per tile) into whole, zero-padded, tile-aligned
  buffers. The shifts and the balance come from a sample of tokens (quant.channel_shift,
  quant.channel_balance), so no pass over all of Q, K and V precedes it. The
  attention kernel streams those buffers with unmasked async copies, which on the H100 beat
  gathering K and V in its own loads even in bf16, the pass included (BENCHMARKS.md).
- Online softmax in base 2 (log2(e) folded into the score scale), fp32 statistics m_i, l_i and
  fp32 accumulator acc. P = exp2(s - m_i) lies in [0, 1]: FP8 e4m3 holds 448 p (a static
  scale that keeps small probabilities out of e4m3's subnormals), INT8 holds round(127 p).
  l_i sums P before rounding, as the reference does; the static scale rides in both acc and
  l_i and cancels. With 8-bit V, acc holds P V in units of the last V tile's scale: a change
  of scale between tiles rides on the rescale by alpha (a factor per row, not per element).
  acc then grows with the largest V tile's scale over the last one's; fp32 holds it unless
  |V - shift| exceeds about 1e22 beside a tile that is all but constant.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from . import formats, hopper_attention
from .formats import CODE, QMAX, is_scaled
from .layout import SequenceLayout, num_blocks
from .quant import BALANCE_LIMIT, MIN_AMAX, QUERY_SCALE_ROWS, SHIFT_SAMPLES
from .tile_order import key_tile, program_tile, swizzle, swizzled_columns

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The kernels' names for formats.CODE's codes: constexprs, the only globals Triton lets a kernel
# read. Host code compares formats.CODE[fmt] with the plain ints, formats.FP8 etc.
FLOAT = tl.constexpr(formats.FLOAT)
INT = tl.constexpr(formats.INT)
FP8 = tl.constexpr(formats.FP8)


@triton.jit
def _rint(x):
    """Round half to even in fp32 (as torch.round) for |x| < 2**22: adding 1.5 * 2**23 leaves no
    fraction bits, so the FPU rounds for us."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _fp8_grid(x):
    """x (fp32, |x| <= 448) rounded to FP8 e4m3's grid (3 fraction bits, subnormal below
    2**-6, ties to even), still in fp32. Only for the CPU interpreter, whose fp32 -> e4m3 cast
    (Triton 3.x) loses its rounding's carry, so that values just under a power of two become
    half of it: after this the cast has nothing to round."""
    quantum = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(x), 2.0**-7))), -6.0) - 3.0)
    return _rint(x / quantum) * quantum


@triton.jit
def _fp8(x, UPCAST: tl.constexpr):
    """x (fp32, |x| <= 448) cast to FP8 e4m3, rounding to nearest even."""
    if UPCAST:
        x = _fp8_grid(x)
    return x.to(tl.float8e4nv)


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

    Returns (rows to read in the source tensor, rows of the original sequence, valid mask,
    whether the tile is ragged). Text tiles cover [0, T), visual tiles the head's order of
    [0, N); tiles of a segment start at the segment's first token, so the last tile of each
    may be ragged.
    """
    is_text = tile < n_text_tiles
    start = tl.where(is_text, tile, tile - n_text_tiles) * BLOCK
    length = tl.where(is_text, T, N)
    pos = start + offs
    valid = pos < length
    token = tl.load(perm_h + tl.where(valid & (tile >= n_text_tiles), pos, 0))  # N >= 1: index 0 exists
    original = tl.where(is_text, text_base + pos, vis_base + token)
    if GATHER:
        source = original
    else:  # prepped buffers hold whole tiles, text tiles first: row = tile * BLOCK + offset,
        source = tile * BLOCK + offs  # so every tile starts 16-byte aligned (cp.async-able)
    return source, original, valid, start + BLOCK > length


@triton.jit
def _gather_tile(
    X,
    tile,
    n_text_tiles,
    T,
    N,
    perm_h,
    offs,
    d,
    text_base,
    vis_base,
    stride_s,
    stride_d,
    BLOCK: tl.constexpr,
    DIM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Load one tile of X (already offset to its batch and head) through the head's order, in
    fp32 when UPCAST (the CPU interpreter's 16-bit dots are wrong). Returns (tile, original
    rows, valid rows)."""
    rows, original, valid, ragged = _rows(tile, n_text_tiles, T, N, perm_h, offs, text_base, vis_base, BLOCK, True)
    x = tl.load(
        X + rows[:, None].to(tl.int64) * stride_s + d[None, :] * stride_d,
        mask=_row_mask(valid, d, DIM, HEAD_DIM),
        other=0.0,
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x, original, valid


@triton.jit
def _scores(q, k_tile, k_offs, QK: tl.constexpr, UPCAST: tl.constexpr):
    """Unscaled scores of the query tile against the key tile at `k_tile` (keys past a
    segment's end are masked in the softmax step).

    Prepped buffers hold whole, zero-padded tiles, so their loads need no mask (a mask that
    varies along V^T's contiguous axis would stop the loads from being vectorised and
    pipelined), and a tile's element offsets from its first element are the same for every
    tile (`k_offs`, computed once before the loop): per tile only a scalar pointer moves."""
    k = tl.load(k_tile + k_offs)
    if UPCAST and QK == FLOAT:  # the CPU interpreter multiplies raw bits in 16-bit dots
        k = k.to(tl.float32)
    if QK == INT:
        s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@triton.jit
def _softmax_step(s, valid, ragged, m_i, l_i, scale, P_SHIFT: tl.constexpr, ROW_SCALES: tl.constexpr):
    """Online softmax over one tile of scores: (P, the rescale factor of what came before, new
    row maxima, new row sums). The score scale is folded into exp2's argument (one FMA per
    score), as is the static scale of 8-bit P (P_SHIFT = log2 448 or log2 127 added to the
    exponent): P and l_i then carry the same factor, which cancels in acc / l_i."""
    if ragged:  # only the last tile of a segment has keys past its end
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale - P_SHIFT)  # m_i: the row maxima less P_SHIFT
    if ROW_SCALES:  # a score scale per row (query scales of several row groups), else one
        p = tl.math.exp2(s * scale[:, None] - m_new[:, None])
    else:
        p = tl.math.exp2(s * scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _ratio(a, b, UPCAST: tl.constexpr):
    """a / b to within 2 ulp (PTX div.approx): an IEEE-ready division's range checks cost ten
    instructions per key tile in the attention loop. The CPU interpreter has no libdevice, so
    there it divides exactly."""
    if UPCAST:
        return a / b
    else:
        return libdevice.fast_dividef(a, b)


@triton.jit
def _accumulate(
    acc, p, v_tile, v_offs, PV: tl.constexpr, UPCAST: tl.constexpr, PV_APART: tl.constexpr, SWIZZLE_V: tl.constexpr
):
    """acc + P V for the V tile at `v_tile` (element offsets `v_offs`, as in `_scores`), P
    already in V's format (upcast to fp32 on the CPU interpreter). PV_APART: compute P V into a
    fresh accumulator and add it in fp32. The tensor cores sum FP8 products into an accumulator
    at reduced precision, which lost up to a third of the output at Wan2.1's 256 key tiles on
    the H100 (BENCHMARKS.md); and fed the rescaled acc, ptxas serialised every wgmma of the
    8-bit head-dim-64 kernel (warning C7515). SWIZZLE_V: the prep pass stored V's keys
    swizzled, so P's columns follow."""
    v = tl.load(v_tile + v_offs)
    if SWIZZLE_V:
        p = swizzled_columns(p)
    if PV == INT:  # INT8 products accumulate in int32, so they are added after conversion
        acc += tl.dot(p, v, out_dtype=tl.int32).to(tl.float32)
    else:  # FP8 (448 p uses e4m3's whole range) or 16-bit
        if UPCAST:
            p, v = p.to(tl.float32), v.to(tl.float32)
        if PV_APART:
            acc += tl.dot(p, v)
        else:
            acc = tl.dot(p, v, acc)
    return acc


@triton.jit
def _p_format(p, v_dtype, PV: tl.constexpr, UPCAST: tl.constexpr):
    """P in the format of the PV product: FP8 e4m3, INT8 round(127 p), or V's 16-bit type."""
    if PV == FP8:
        return _fp8(p, UPCAST)
    elif PV == INT:
        return _rint(p).to(tl.int8)
    else:
        return p.to(v_dtype)


@triton.jit
def _paro_attention_kernel(
    Q,
    K,
    V,
    Out,
    Perm,
    KvIndex,
    KvCount,
    KScale,
    VScale,
    VShift,
    Balance,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    H,
    T,
    N,
    n_text_tiles,
    nb,
    score_scale,
    text_first,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM: tl.constexpr,
    QK: tl.constexpr,
    QK_QMAX: tl.constexpr,
    PV: tl.constexpr,
    UPCAST: tl.constexpr,
    MIN_AMAX_: tl.constexpr,
    P_SHIFT: tl.constexpr,
    SPLIT: tl.constexpr,
    PV_APART: tl.constexpr,
    SWIZZLE_V: tl.constexpr,
    Q_GROUP: tl.constexpr,
):
    """Out has Q's layout and strides. Q is read from the caller's tensor through the head's
    order, K and V from the prep pass's paro-order buffers; Balance (B * H, DIM) holds the
    factors the prep pass multiplied K by, which 8-bit QK divides Q by. Programs are numbered
    in launch order (axis 0 fastest): tile_order.program_tile says which query tile each one
    takes, and SPLIT programs in a row share it, each computing BLOCK // SPLIT of its rows."""
    n_tiles = n_text_tiles + nb
    pid = tl.program_id(0) + tl.program_id(1).to(tl.int64) * n_tiles * SPLIT
    tile, bh = program_tile(pid // SPLIT, n_text_tiles, nb, tl.num_programs(1))
    b = bh // H
    h = bh % H
    ROWS: tl.constexpr = BLOCK // SPLIT
    offs = tl.arange(0, BLOCK)
    q_offs = (pid % SPLIT).to(tl.int32) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    perm_h = Perm + h.to(tl.int64) * N
    text_base = (1 - text_first) * N  # original position of the first text / visual token
    vis_base = text_first * T

    # int64 offsets: B*S*H*D exceeds 2**31 at real sizes.
    q_ptr = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_ptr = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_ptr = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    k_scales = KScale + bh.to(tl.int64) * n_tiles
    v_scales = VScale + bh.to(tl.int64) * n_tiles

    q, original, valid = _gather_tile(
        q_ptr,
        tile,
        n_text_tiles,
        T,
        N,
        perm_h,
        q_offs,
        d,
        text_base,
        vis_base,
        stride_qs,
        stride_qd,
        BLOCK,
        DIM,
        HEAD_DIM,
        False,
    )
    q_mask = _row_mask(valid, d, DIM, HEAD_DIM)
    if QK == FLOAT:
        if UPCAST:
            q = q.to(tl.float32)
        else:
            q = q.to(K.dtype.element_ty)
    else:  # quantise the query rows here: they are loaded once per program, so this costs nothing
        # Q / a first (quant.channel_balance; the prep pass multiplied K by a): Q K^T is unchanged
        inv_a = 1.0 / tl.load(Balance + bh.to(tl.int64) * DIM + d, mask=d < DIM, other=1.0)
        qf = q.to(tl.float32) * inv_a[None, :]
        if ROWS > Q_GROUP:  # several groups of rows, one scale each: a scale per row
            amax = tl.reshape(tl.max(tl.abs(qf), 1), [ROWS // Q_GROUP, Q_GROUP])
            amax = tl.reshape(tl.broadcast_to(tl.max(amax, 1)[:, None], [ROWS // Q_GROUP, Q_GROUP]), [ROWS])
            q_scale = tl.maximum(amax, MIN_AMAX_) / QK_QMAX
            qf = qf / q_scale[:, None]
        else:  # the rows' group spans PARTS programs: read the other programs' rows too
            PARTS: tl.constexpr = Q_GROUP // ROWS
            part = pid % SPLIT
            amax = 0.0
            for other in tl.static_range(1, PARTS):
                sibling = part - part % PARTS + (part + other) % PARTS
                other_q = _gather_tile(
                    q_ptr,
                    tile,
                    n_text_tiles,
                    T,
                    N,
                    perm_h,
                    sibling.to(tl.int32) * ROWS + tl.arange(0, ROWS),
                    d,
                    text_base,
                    vis_base,
                    stride_qs,
                    stride_qd,
                    BLOCK,
                    DIM,
                    HEAD_DIM,
                    False,
                )[0]
                amax = tl.maximum(amax, tl.max(tl.max(tl.abs(other_q.to(tl.float32) * inv_a[None, :]), 1), 0))
            # q's own rows last: their load and the other programs' are then in flight together
            amax = tl.maximum(amax, tl.max(tl.max(tl.abs(qf), 1), 0))
            q_scale = tl.maximum(amax, MIN_AMAX_) / QK_QMAX
            qf = qf / q_scale
        qf = tl.minimum(tl.maximum(qf, -QK_QMAX), QK_QMAX)
        if QK == INT:
            q = _rint(qf).to(tl.int8)
        else:
            q = _fp8(qf, UPCAST)
        score_scale = score_scale * q_scale

    is_text = tile < n_text_tiles
    vis_tile = tl.where(is_text, 0, tile - n_text_tiles)
    list_ptr = KvIndex + (h.to(tl.int64) * nb + vis_tile) * nb
    n_keys = n_text_tiles + tl.where(is_text, nb, tl.load(KvCount + h.to(tl.int64) * nb + vis_tile))

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    v_scale = 1.0  # 8-bit V: the scale of the V tile acc is in units of
    v_dtype = V.dtype.element_ty
    # offsets within a tile, unsigned: 32 bits suffice, and their zero extension costs nothing
    k_offs = (offs[:, None] * stride_ks + d[None, :] * stride_kd).to(tl.uint32)
    v_offs = (offs[:, None] * stride_vs + d[None, :] * stride_vd).to(tl.uint32)
    for j in range(0, n_keys):
        kt = key_tile(j, n_text_tiles, list_ptr, is_text)
        _, _, kvalid, ragged = _rows(kt, n_text_tiles, T, N, perm_h, offs, text_base, vis_base, BLOCK, False)
        first_row = kt.to(tl.int64) * BLOCK  # prepped buffers: tile kt starts at row kt * BLOCK
        scale = score_scale
        if QK != FLOAT:
            scale = scale * tl.load(k_scales + kt)
        s = _scores(q, k_ptr + first_row * stride_ks, k_offs, QK, UPCAST)
        p, alpha, m_i, l_i = _softmax_step(s, kvalid, ragged, m_i, l_i, scale, P_SHIFT, QK != FLOAT and ROWS > Q_GROUP)
        if PV != FLOAT:
            v_next = tl.load(v_scales + kt)
            alpha = alpha * _ratio(v_scale, v_next, UPCAST)
            v_scale = v_next
        acc = acc * alpha[:, None]
        acc = _accumulate(
            acc,
            _p_format(p, v_dtype, PV, UPCAST),
            v_ptr + first_row * stride_vs,
            v_offs,
            PV,
            UPCAST,
            PV_APART,
            SWIZZLE_V,
        )

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if PV != FLOAT:  # undo V's scale, add back the shift the prep pass removed (a row that saw no key stays 0)
        v_shift = tl.load(VShift + bh.to(tl.int64) * DIM + d, mask=d < DIM, other=0.0)
        out = tl.where(l_i[:, None] > 0, out * v_scale + v_shift[None, :], 0.0)
    o_ptr = Out + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    tl.store(
        o_ptr + original[:, None].to(tl.int64) * stride_qs + d[None, :] * stride_qd,
        out.to(Out.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _quantise_tile(x, FMT: tl.constexpr, QMAX_: tl.constexpr, MIN_AMAX_: tl.constexpr, UPCAST: tl.constexpr):
    """(codes, scale) of one tile: one scale for the tile (INT/FP8) or none (FLOAT). Codes stay
    fp32 for the store to cast: INT codes are already integers; FP8 codes are rounded by the
    cast (on the CPU interpreter, onto e4m3's grid first: see `_fp8_grid`)."""
    if FMT == FLOAT:
        return x, 1.0
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), MIN_AMAX_) / QMAX_
    y = tl.minimum(tl.maximum(x / scale, -QMAX_), QMAX_)
    if FMT == INT:
        y = _rint(y)
    elif UPCAST:
        y = _fp8_grid(y)
    return y, scale


@triton.jit
def _prep_kernel(
    K,
    V,
    Perm,
    KShift,
    VShift,
    Balance,
    Kp,
    Vp,
    KScale,
    VScale,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_pd,
    stride_vpb,
    stride_vph,
    stride_vps,
    stride_vpd,
    H,
    T,
    N,
    n_text_tiles,
    nb,
    text_first,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM: tl.constexpr,
    QK: tl.constexpr,
    QK_QMAX: tl.constexpr,
    PV: tl.constexpr,
    PV_QMAX: tl.constexpr,
    MIN_AMAX_: tl.constexpr,
    SWIZZLE_V: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One fused pass over K and V: gather a tile in paro order, remove K's and V's channel
    shifts, multiply K by the balance (Balance (B * H, DIM): the factors the attention kernels
    divide Q by), quantise each with one scale per tile, write contiguous paro-order buffers (V
    transposed when 8-bit, as FP8/INT8 tensor-core products want their second operand
    K-major; its keys swizzled within the tile when SWIZZLE_V). QK, PV: formats.CODE's codes."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    perm_h = Perm + h.to(tl.int64) * N
    source, original, valid, ragged = _rows(
        tile, n_text_tiles, T, N, perm_h, offs, (1 - text_first) * N, text_first * T, BLOCK, True
    )
    buf_rows, buf_original, buf_valid, buf_ragged = _rows(tile, n_text_tiles, T, N, perm_h, offs, 0, 0, BLOCK, False)
    rows = original[:, None].to(tl.int64)
    k_src = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + rows * stride_ks + d[None, :] * stride_kd
    v_src = b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + rows * stride_vs + d[None, :] * stride_vd
    dst = (
        b.to(tl.int64) * stride_pb
        + h.to(tl.int64) * stride_ph
        + buf_rows[:, None].to(tl.int64) * stride_ps
        + d[None, :] * stride_pd
    )
    v_rows = tile * BLOCK + swizzle(offs) if SWIZZLE_V else buf_rows
    vdst = (
        b.to(tl.int64) * stride_vpb
        + h.to(tl.int64) * stride_vph
        + v_rows[:, None].to(tl.int64) * stride_vps
        + d[None, :] * stride_vpd
    )
    mask = _row_mask(valid, d, DIM, HEAD_DIM)  # stores are whole tiles: zeros outside it

    k = tl.load(K + k_src, mask=mask, other=0.0).to(tl.float32)
    if QK != FLOAT:  # softmax ignores a shift shared by all keys, Q K^T the balance (Q / a meets K a)
        channel = bh.to(tl.int64) * DIM + d
        k_shift = tl.load(KShift + channel, mask=d < DIM, other=0.0)
        k = tl.where(mask, (k - k_shift[None, :]) * tl.load(Balance + channel, mask=d < DIM, other=1.0)[None, :], 0.0)
    k, k_scale = _quantise_tile(k, QK, QK_QMAX, MIN_AMAX_, UPCAST)
    tl.store(Kp + dst, k.to(Kp.dtype.element_ty))
    if QK != FLOAT:
        tl.store(KScale + bh.to(tl.int64) * (n_text_tiles + nb) + tile, k_scale)

    v = tl.load(V + v_src, mask=mask, other=0.0).to(tl.float32)
    if PV != FLOAT:
        v = tl.where(mask, v - tl.load(VShift + bh.to(tl.int64) * DIM + d, mask=d < DIM, other=0.0)[None, :], 0.0)
    v, v_scale = _quantise_tile(v, PV, PV_QMAX, MIN_AMAX_, UPCAST)
    tl.store(Vp + vdst, v.to(Vp.dtype.element_ty))
    if PV != FLOAT:
        tl.store(VScale + bh.to(tl.int64) * (n_text_tiles + nb) + tile, v_scale)


@triton.jit
def _sampled_tokens(X, base, stride_s, stride_d, t, step, count, d, DIM: tl.constexpr):
    """Sampled tokens t (every `step`-th, `count` of them) of one (batch, head) of X, as fp32
    (CHUNK, HEAD_DIM) with zeros outside them, and that mask."""
    valid = (t < count)[:, None] & (d < DIM)[None, :]
    x = tl.load(X + base + (t * step).to(tl.int64)[:, None] * stride_s + d[None, :] * stride_d, mask=valid, other=0.0)
    return x.to(tl.float32), valid


@triton.jit
def _smoothing_kernel(
    Q,
    K,
    V,
    KShift,
    VShift,
    Balance,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    H,
    step,
    count,
    HEAD_DIM: tl.constexpr,
    DIM: tl.constexpr,
    CHUNK: tl.constexpr,
    SMOOTH_QK: tl.constexpr,
    SMOOTH_PV: tl.constexpr,
    MIN_AMAX_: tl.constexpr,
    LIMIT: tl.constexpr,
):
    """One (batch, head) per program: quant.channel_shift of K and V and quant.channel_balance
    of Q against K, from the same sampled tokens, in one launch (torch takes a dozen small ones,
    which cost short sequences more than the prep pass itself). Outputs are (B * H, DIM) fp32."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    out = bh.to(tl.int64) * DIM + d
    k_sum = tl.zeros([HEAD_DIM], tl.float32)
    v_sum = tl.zeros([HEAD_DIM], tl.float32)
    q_amax = tl.zeros([HEAD_DIM], tl.float32)
    for t0 in range(0, count, CHUNK):
        t = t0 + tl.arange(0, CHUNK)
        if SMOOTH_QK:
            k, _ = _sampled_tokens(K, b * stride_kb + h * stride_kh, stride_ks, stride_kd, t, step, count, d, DIM)
            k_sum += tl.sum(k, 0)
            q, _ = _sampled_tokens(Q, b * stride_qb + h * stride_qh, stride_qs, stride_qd, t, step, count, d, DIM)
            q_amax = tl.maximum(q_amax, tl.max(tl.abs(q), 0))
        if SMOOTH_PV:
            v, _ = _sampled_tokens(V, b * stride_vb + h * stride_vh, stride_vs, stride_vd, t, step, count, d, DIM)
            v_sum += tl.sum(v, 0)
    if SMOOTH_PV:
        tl.store(VShift + out, v_sum / (count * 1.0), mask=d < DIM)
    if SMOOTH_QK:
        k_shift = k_sum / (count * 1.0)
        tl.store(KShift + out, k_shift, mask=d < DIM)
        k_amax = tl.zeros([HEAD_DIM], tl.float32)
        for t0 in range(0, count, CHUNK):  # K less its shift: a second pass over the samples
            t = t0 + tl.arange(0, CHUNK)
            k, valid = _sampled_tokens(K, b * stride_kb + h * stride_kh, stride_ks, stride_kd, t, step, count, d, DIM)
            k_amax = tl.maximum(k_amax, tl.max(tl.where(valid, tl.abs(k - k_shift[None, :]), 0.0), 0))
        ratio = tl.div_rn(tl.maximum(q_amax, MIN_AMAX_), tl.maximum(k_amax, MIN_AMAX_))
        balance = tl.minimum(tl.maximum(tl.sqrt_rn(ratio), 1.0 / LIMIT), LIMIT)
        tl.store(Balance + out, balance, mask=d < DIM)


# --------------------------------------------------------------------------------------------
# Host side


def channel_smoothing(q, k, v, qk: str, pv: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K shift, V shift, balance), each (B, H, D) float32, as quant.channel_shift and
    quant.channel_balance define them (to float32 rounding: the sums run in another order), in
    one launch; each one the formats do not use is an unread placeholder."""
    bsz, seq, heads, dim = k.shape
    unread = torch.empty(1, device=k.device, dtype=torch.float32)
    if not (is_scaled(qk) or is_scaled(pv)):
        return unread, unread, unread
    step = -(-seq // SHIFT_SAMPLES)
    k_shift, v_shift, balance = (
        torch.empty(bsz, heads, dim, device=k.device, dtype=torch.float32) if used else unread
        for used in (is_scaled(qk), is_scaled(pv), is_scaled(qk))
    )
    _smoothing_kernel[(bsz * heads,)](
        q,
        k,
        v,
        k_shift,
        v_shift,
        balance,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        q.stride(3),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        k.stride(3),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        v.stride(3),
        heads,
        step,
        -(-seq // step),
        HEAD_DIM=padded_head_dim(dim),
        DIM=dim,
        CHUNK=32,
        SMOOTH_QK=is_scaled(qk),
        SMOOTH_PV=is_scaled(pv),
        MIN_AMAX_=MIN_AMAX,
        LIMIT=BALANCE_LIMIT,
        num_warps=1 if INTERPRET else 4,
    )
    return k_shift, v_shift, balance


STORAGE = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.int8,
    "int4": torch.int8,
    "fp8": torch.float8_e4m3fn,
}
P_SCALE = {"fp8": QMAX["fp8"], "int8": QMAX["int8"]}  # static scale of 8-bit P (P <= 1)


def padded_head_dim(dim: int) -> int:
    """Tiles span a power of two >= 32 channels: tl.arange needs a power of two, and 8-bit
    tensor-core products reduce over at least 32."""
    return max(32, triton.next_power_of_2(dim))


def _warps_and_stages(block: int, head_dim: int) -> dict:
    """One warpgroup (4 warps) everywhere but on 128x128 tiles with 128 channels, whose
    accumulator and scores need two warpgroups' registers; three stages everywhere (a fourth
    buys nothing in the 8-bit modes and, with 16-bit tiles, costs a resident program per SM)."""
    if INTERPRET:
        return {"num_warps": 1, "num_stages": 1}
    return {"num_warps": 8 if block >= 128 and head_dim > 64 else 4, "num_stages": 3}


def launch_config(block: int, head_dim: int, qk: str, pv: str) -> dict:
    """Launch options of the attention kernel, from the H100 sweeps in BENCHMARKS.md.

    Head dim <= 64, 8-bit QK and FP8 PV on 128-row tiles: the loop is bound by the softmax,
    not the tensor cores, so each tile is split between two programs of 64 rows
    (SageAttention2's sm90 kernel uses 64-row CTAs too) capped at 128 registers, which fits
    four programs per SM whose softmax and products overlap; V's keys swizzled (see
    `tile_order.swizzle`). With 16-bit PV the same split measured 28% slower. FP8 P V products are
    always computed apart (see `_accumulate`)."""
    fp8_pv = CODE[pv] == formats.FP8
    config = {**_warps_and_stages(block, head_dim), "split": 1, "pv_apart": fp8_pv, "swizzle_v": False}
    if not INTERPRET and block >= 128 and head_dim <= 64 and is_scaled(qk) and fp8_pv:
        config.update(num_warps=4, split=2, maxnreg=128, swizzle_v=True)
    return config


def _check(q, k, v, perm, kv_index, kv_count, block, layout, qk, pv):
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 4:
        raise ValueError(
            f"q, k, v must share one (B, S, H, D) shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must be bf16 or fp16, got {q.dtype}, {k.dtype}, {v.dtype}")
    lo, hi = formats.TRITON_MIN_HEAD_DIM, formats.TRITON_MAX_HEAD_DIM
    if not lo <= q.shape[-1] <= hi:
        raise ValueError(f"head dim {q.shape[-1]} unsupported (supported: {lo} to {hi})")
    if block not in formats.TRITON_BLOCKS:
        raise ValueError(f"block {block} unsupported (supported: {formats.TRITON_BLOCKS})")
    if qk not in formats.TRITON_QK_FORMATS or pv not in formats.TRITON_PV_FORMATS:
        raise ValueError(f"unsupported precision QK {qk} / PV {pv}")
    n = layout.visual_len(q.shape[1])
    nb = num_blocks(n, block)
    if perm.shape != (q.shape[2], n) or kv_index.shape != (q.shape[2], nb, nb) or kv_count.shape != (q.shape[2], nb):
        raise ValueError(
            f"perm/kv_index/kv_count shapes {tuple(perm.shape)}/{tuple(kv_index.shape)}/{tuple(kv_count.shape)} "
            f"do not fit H={q.shape[2]}, N={n}, block={block}"
        )
    for name, t, dtypes in (
        ("perm", perm, (torch.int32, torch.int64)),
        ("kv_index", kv_index, (torch.int32,)),
        ("kv_count", kv_count, (torch.int32,)),
    ):
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
    config: dict | None = None,
) -> torch.Tensor:
    """Reordered block-sparse attention; q, k, v (B, S, H, D) bf16/fp16 as diffusers passes them.

    perm (H, N) int32/int64: each head's visual order. kv_index (H, nb, nb) int32 / kv_count (H, nb)
    int32: per visual query tile, the kept visual key tiles first (see layout.kept_block_lists).
    out: an optional (B, S, H, D) tensor to write into. config: launch options overriding
    `launch_config` (for tuning sweeps of the portable kernel, which then serves the call).

    On an H100 the calls hopper_attention covers go to that warp-specialised kernel, the rest
    to the portable kernel below; both read the same prep-pass buffers.
    """
    _check(q, k, v, perm, kv_index, kv_count, block, layout, qk, pv)
    bsz, seq, heads, dim = q.shape
    t = layout.text_len
    n = seq - t
    nb = num_blocks(n, block)
    n_text_tiles = num_blocks(t, block)
    qk_code, pv_code = CODE[qk], CODE[pv]
    score_scale = (dim**-0.5 if scale is None else scale) * LOG2E
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.dtype != q.dtype or out.stride() != q.stride():
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with q's strides")

    hopper = (
        config is None and q.stride(3) == 1 and hopper_attention.chosen(q.device, block, padded_head_dim(dim), qk, pv)
    )
    fp8_pv = pv_code == formats.FP8
    launch = {"swizzle_v": fp8_pv} if hopper else dict(config or launch_config(block, dim, qk, pv))
    split, pv_apart, swizzle_v = launch.pop("split", 1), launch.pop("pv_apart", fp8_pv), launch.pop("swizzle_v", False)
    if block % split or block // split < 16:
        raise ValueError(f"split {split} does not cut block {block} into tiles of at least 16 rows")
    ks, vs, k_scale, v_scale, v_shift, balance = prepare_kv(
        q, k, v, perm, block, layout, qk, pv, n_text_tiles, nb, swizzle_v
    )
    p_shift = math.log2(P_SCALE.get(pv, 1.0))
    if hopper:
        hopper_attention.launch(
            q,
            ks,
            vs,
            out,
            perm,
            kv_index,
            kv_count,
            k_scale,
            v_scale,
            v_shift,
            balance,
            heads=heads,
            t=t,
            n=n,
            n_text_tiles=n_text_tiles,
            nb=nb,
            score_scale=score_scale,
            text_first=int(layout.text_first),
            dim=dim,
            qk_code=qk_code,
            qk_qmax=QMAX.get(qk, 1.0),
            pv_code=pv_code,
            min_amax=MIN_AMAX,
            p_shift=p_shift,
        )
        return out
    # 8-bit V: (B, H, D, S)
    sv = (vs.stride(0), vs.stride(1), vs.stride(3), vs.stride(2)) if is_scaled(pv) else vs.stride()
    sq = (q.stride(0), q.stride(2), q.stride(1), q.stride(3))
    _paro_attention_kernel[((n_text_tiles + nb) * split, bsz * heads)](
        q,
        ks,
        vs,
        out,
        perm,
        kv_index,
        kv_count,
        k_scale,
        v_scale,
        v_shift,
        balance,
        *sq,
        *ks.stride(),
        *sv,
        heads,
        t,
        n,
        n_text_tiles,
        nb,
        score_scale,
        int(layout.text_first),
        BLOCK=block,
        HEAD_DIM=padded_head_dim(dim),
        DIM=dim,
        QK=qk_code,
        QK_QMAX=QMAX.get(qk, 1.0),
        PV=pv_code,
        UPCAST=INTERPRET,
        MIN_AMAX_=MIN_AMAX,
        P_SHIFT=p_shift,
        SPLIT=split,
        PV_APART=pv_apart,
        SWIZZLE_V=swizzle_v,
        Q_GROUP=min(block, QUERY_SCALE_ROWS),
        **launch,
    )
    return out


def prepare_kv(q, k, v, perm, block, layout, qk, pv, n_text_tiles, nb, swizzle_v=False):
    """The fused prep pass: paro-order K and V in the compute formats, their scales per tile,
    V's channel shift, and the balance of Q's channels against K's (quant.channel_balance, from
    samples of q and k: this pass multiplies K by it, the attention kernels divide Q by it).
    V's keys are swizzled within each tile when `swizzle_v`, for the kernel launched with it.
    Returns (K, V, K scales, V scales, V shift, balance (B, H, D) float32); the 16-bit formats
    use no scale, shift or balance, whose tensors are then not read."""
    bsz, seq, heads, dim = k.shape
    rows = (n_text_tiles + nb) * block  # whole tiles, text tiles first, channels padded
    width = padded_head_dim(dim)
    kp = torch.empty(bsz, heads, rows, width, device=k.device, dtype=STORAGE[qk])
    if is_scaled(pv):
        vp = torch.empty(bsz, heads, width, rows, device=k.device, dtype=STORAGE[pv])
        svp = (vp.stride(0), vp.stride(1), vp.stride(3), vp.stride(2))
    else:
        vp = torch.empty(bsz, heads, rows, width, device=k.device, dtype=STORAGE[pv])
        svp = vp.stride()
    k_scale, v_scale = (
        torch.empty(bsz, heads, n_text_tiles + nb, device=k.device, dtype=torch.float32) for _ in range(2)
    )
    k_shift, v_shift, balance = channel_smoothing(q, k, v, qk, pv)
    _prep_kernel[(n_text_tiles + nb, bsz * heads)](
        k,
        v,
        perm,
        k_shift,
        v_shift,
        balance,
        kp,
        vp,
        k_scale,
        v_scale,
        *k.stride(),
        *v.stride(),
        *kp.stride(),
        *svp,
        heads,
        layout.text_len,
        seq - layout.text_len,
        n_text_tiles,
        nb,
        int(layout.text_first),
        BLOCK=block,
        HEAD_DIM=padded_head_dim(dim),
        DIM=dim,
        QK=CODE[qk],
        QK_QMAX=QMAX.get(qk, 1.0),
        PV=CODE[pv],
        PV_QMAX=QMAX.get(pv, 1.0),
        MIN_AMAX_=MIN_AMAX,
        SWIZZLE_V=swizzle_v,
        UPCAST=INTERPRET,
        **_warps_and_stages(block, dim),
    )
    return kp, vp, k_scale, v_scale, v_shift, balance
