"""PAROAttention forward for Hopper (sm_90), warp-specialised, in Gluon.

Same semantics, inputs and prep-pass buffers as triton_attention.py (read that first); what
differs is how one program's warps share the work of a 128-row query tile, following
FlashAttention-3's schedule, which Triton's own compiler does not produce for sm_90:

- A producer warp streams the key tiles the query tile visits (text tiles, then its kept
  list) into a ring of STAGES shared-memory buffers by TMA. Buffers change hands through
  mbarriers: `kv_ready[s]` (the copy landed) and `kv_empty[s]` (both consumers are done).
- Two consumer warpgroups each own 64 of the tile's rows and run the online softmax. At key
  tile j a consumer issues O += P_j V_j and S_{j+1} = Q K_{j+1}^T together, then waits for
  both (with FP8 V, for P_j V_j first: below). Ping-pong: two `turn` mbarriers make the
  consumers take turns at issuing, so the tensor cores serve one warpgroup while the other
  runs its softmax.
- setmaxnreg moves registers from the producer (24 per thread) to the consumers (240).
- With FP8 V, each P V product goes into a fresh accumulator and is added to acc in fp32, as
  in the portable kernel (triton_attention._accumulate says why); the add runs while the next
  tile's score product is still in flight. FP8 P reaches that product in the registers the
  score accumulator left its values in (tile_order.swizzled_columns; the prep pass stored V's
  keys swizzled to match, as for the portable kernel), so the layout change moves no data.

On the H100 this beats the portable kernel by 1.2-1.4x at head dim 128 and in 16-bit at head
dim 64 (BENCHMARKS.md). At head dim 64 with 8-bit QK the softmax, not the tensor cores,
bounds the loop, and the portable kernel, which fits several programs per SM, is faster:
`chosen` sends those calls there.

Gluon is experimental and its API moves between Triton releases. This module is written
against Triton 3.6 (the release torch 2.11 ships); `available` is false elsewhere and the
portable kernel serves every call.
"""

from __future__ import annotations

import torch
import triton

from . import formats
from .formats import HOPPER_PV_FORMATS, is_scaled
from .tile_order import key_tile, program_tile, swizzled_columns

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _IMPORTED = True
except ImportError:  # a Triton without this Gluon API: the portable kernel serves
    _IMPORTED = False

BLOCK = 128  # query rows per program: two consumer warpgroups of 64
HEAD_DIMS = (64, 128)  # padded head dims the kernel is built and tested for
SHARED_MEMORY = 232448 - 1024  # H100's per-block limit, less room for the mbarriers


def available(device: torch.device) -> bool:
    """True on an sm_90 GPU with the Triton release this module was written for."""
    return (
        _IMPORTED
        and device.type == "cuda"
        and triton.__version__.startswith("3.6.")
        and torch.cuda.get_device_capability(device) == (9, 0)
    )


def chosen(device: torch.device, block: int, head_dim: int, qk: str, pv: str) -> bool:
    """Whether a call goes to this kernel (head_dim: the padded one). Head dim 64 with 8-bit
    QK stays on the portable kernel, which is faster there (module docstring)."""
    return (
        block == BLOCK
        and head_dim in HEAD_DIMS
        and pv in HOPPER_PV_FORMATS
        and not (head_dim == 64 and is_scaled(qk))
        and available(device)
    )


def stages(head_dim: int, qk_bytes: int, pv_bytes: int) -> int:
    """Depth of the K/V ring: as many buffers as shared memory holds beside Q, at most four."""
    tile = BLOCK * head_dim
    return min(4, (SHARED_MEMORY - tile * qk_bytes) // (tile * (qk_bytes + pv_bytes)))


if _IMPORTED:
    # formats.CODE's codes as the kernels name them (as in triton_attention.py: constexprs, the
    # only globals a kernel may read). PV is never INT here: HOPPER_PV_FORMATS.
    FLOAT = gl.constexpr(formats.FLOAT)
    INT = gl.constexpr(formats.INT)

    @gluon.constexpr_function
    def _mma_layout(n, operand_bits):
        """wgmma accumulator layout of one warpgroup's 64 rows: one n-wide instruction."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 256 // operand_bits])

    @gluon.jit
    def _acquire(turn, c: gl.constexpr, t):
        """Wait for consumer c's t-th turn at the tensor cores. Consumer 0 goes first, then they
        alternate: each arrives on the other's `turn` barrier once per turn it takes."""
        k = t - 1 + c
        mbarrier.wait(turn.index(c), k & 1, pred=k >= 0)

    @gluon.jit
    def _produce(
        k_desc,
        v_desc,
        k_smem,
        v_smem,
        kv_ready,
        kv_empty,
        list_ptr,
        is_text,
        n_text_tiles,
        n_keys,
        n_tiles,
        kv_row0,
        v_row0,
        PV: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        """The producer warp: TMA copies of the visited K and V tiles into the ring."""
        BLOCK: gl.constexpr = k_desc.block_shape[0]
        for j in range(gl.maximum(n_keys, 1)):
            s = j % STAGES
            mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
            kt = gl.minimum(key_tile(j, n_text_tiles, list_ptr, is_text), n_tiles - 1)
            ready = kv_ready.index(s)
            mbarrier.expect(ready, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row0 + kt * BLOCK, 0], ready, k_smem.index(s))
            if PV == FLOAT:
                tma.async_copy_global_to_shared(v_desc, [kv_row0 + kt * BLOCK, 0], ready, v_smem.index(s))
            else:
                tma.async_copy_global_to_shared(v_desc, [v_row0, kt * BLOCK], ready, v_smem.index(s))

    @gluon.jit
    def _tile_scales(kscale_ptr, vscale_ptr, kt, score_scale, QK: gl.constexpr, PV: gl.constexpr):
        """(score scale, V scale) of key tile kt: the score scale times K's tile scale for 8-bit
        QK, V's tile scale for 8-bit PV (1 otherwise)."""
        scale = score_scale
        if QK != FLOAT:
            scale = scale * gl.load(kscale_ptr + kt)
        v_scale = 1.0
        if PV != FLOAT:
            v_scale = gl.load(vscale_ptr + kt)
        return scale, v_scale

    @gluon.jit
    def _consume(
        c: gl.constexpr,
        q_smem,
        k_smem,
        v_smem,
        kv_ready,
        kv_empty,
        turn,
        kscale_ptr,
        vscale_ptr,
        list_ptr,
        is_text,
        n_text_tiles,
        n_keys,
        n_tiles,
        score_scale,
        T,
        N,
        QK: gl.constexpr,
        PV: gl.constexpr,
        P_SHIFT: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        """Consumer c: the online softmax of query rows [64 c, 64 c + 64). Returns (acc, l_i,
        the scale of the V tile acc is in units of: see triton_attention's module docstring).

        The loop is rotated: S_j arrives from the previous iteration, so what each iteration
        issues at once (P_j V_j and the next tile's scores) is what the other consumer's
        softmax can hide. Tile indices are loaded an iteration ahead of their scales, so the
        scales' loads wait for nothing and land while the products run. The
        last iteration's score product reads a stale buffer and is discarded. An empty key
        list runs one tile, whose result `_store` discards."""
        qk_ty: gl.constexpr = k_smem.dtype
        pv_ty: gl.constexpr = v_smem.dtype
        BLOCK: gl.constexpr = k_smem.shape[1]
        HEAD_DIM: gl.constexpr = q_smem.shape[1]
        s_layout: gl.constexpr = _mma_layout(BLOCK, qk_ty.primitive_bitwidth)
        o_layout: gl.constexpr = _mma_layout(HEAD_DIM, pv_ty.primitive_bitwidth)
        p_layout: gl.constexpr = gl.DotOperandLayout(
            operand_index=0, parent=o_layout, k_width=32 // pv_ty.primitive_bitwidth
        )
        q_rows = q_smem.slice(c * 64, 64)
        if QK == INT:
            s_zero = gl.zeros([64, BLOCK], gl.int32, s_layout)
        else:
            s_zero = gl.zeros([64, BLOCK], gl.float32, s_layout)
        key = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, s_layout))
        n = gl.maximum(n_keys, 1)

        mbarrier.wait(kv_ready.index(0), 0)
        _acquire(turn, c, 0)
        s_next = warpgroup_mma(q_rows, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.arrive(turn.index(1 - c))
        s_next = warpgroup_mma_wait(0, deps=[s_next])

        m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_layout))
        acc = gl.zeros([64, HEAD_DIM], gl.float32, o_layout)
        o_zero = gl.zeros([64, HEAD_DIM], gl.float32, o_layout)
        kt = gl.minimum(key_tile(0, n_text_tiles, list_ptr, is_text), n_tiles - 1)
        kt_next = gl.minimum(key_tile(gl.minimum(1, n - 1), n_text_tiles, list_ptr, is_text), n_tiles - 1)
        scale, v_next = _tile_scales(kscale_ptr, vscale_ptr, kt, score_scale, QK, PV)
        v_scale = 1.0  # any value, as acc is 0 until the first tile; not `v_next`, whose alias Triton would not carry
        for j in range(n):
            s = s_next.to(gl.float32)
            in_text = kt < n_text_tiles
            start = gl.where(in_text, kt, kt - n_text_tiles) * BLOCK
            length = gl.where(in_text, T, N)
            if start + BLOCK > length:  # only the last tile of a segment has keys past its end
                s = gl.where((start + key < length)[None, :], s, float("-inf"))
            # as triton_attention._softmax_step: scale and P's static scale folded into exp2
            m_new = gl.maximum(m_i, gl.max(s, 1) * scale)
            p = gl.exp2(s * scale - (m_new - P_SHIFT)[:, None])
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, 1)
            m_i = m_new
            if PV != FLOAT:
                alpha = alpha * gl.fdiv(v_scale, v_next)
                v_scale = v_next
            alpha = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            if PV == FLOAT:
                acc = acc * alpha
            p_op = p.to(pv_ty)
            if PV != FLOAT:
                p_op = swizzled_columns(p_op)
            p_op = gl.convert_layout(p_op, p_layout)

            nxt = j + 1
            kt = kt_next
            scale, v_next = _tile_scales(kscale_ptr, vscale_ptr, kt, score_scale, QK, PV)
            kt_next = gl.minimum(key_tile(gl.minimum(nxt + 1, n - 1), n_text_tiles, list_ptr, is_text), n_tiles - 1)
            mbarrier.wait(kv_ready.index(nxt % STAGES), (nxt // STAGES) & 1, pred=nxt < n)
            _acquire(turn, c, nxt)
            v_tile = v_smem.index(j % STAGES)
            if PV != FLOAT:  # 8-bit V is stored (channels, keys): the K-major operand 8-bit wgmma wants
                v_tile = v_tile.permute((1, 0))
            if PV == FLOAT:
                acc = warpgroup_mma(p_op, v_tile, acc, is_async=True)
            else:  # 8-bit products apart, added in fp32: the tensor cores sum them into acc at reduced precision
                pv = warpgroup_mma(p_op, v_tile, o_zero, use_acc=False, is_async=True)
            s_next = warpgroup_mma(
                q_rows, k_smem.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            mbarrier.arrive(turn.index(1 - c))
            if PV == FLOAT:
                acc, s_next = warpgroup_mma_wait(0, deps=[acc, s_next])
            else:  # P V was issued first: add it in while the score product still runs
                pv = warpgroup_mma_wait(1, deps=[pv])
                acc = acc * alpha + pv
                s_next = warpgroup_mma_wait(0, deps=[s_next])
            mbarrier.arrive(kv_empty.index(j % STAGES))
        return acc, l_i, v_scale

    @gluon.jit
    def _store(
        acc,
        l_i,
        v_scale,
        row0: gl.constexpr,
        n_keys,
        tile,
        n_text_tiles,
        T,
        N,
        o_ptr,
        vshift_ptr,
        perm_h,
        text_base,
        vis_base,
        stride_qs,
        BLOCK: gl.constexpr,
        PV: gl.constexpr,
        DIM: gl.constexpr,
    ):
        """Normalise 64 rows and write them back through the head's order."""
        o_layout: gl.constexpr = acc.type.layout
        HEAD_DIM: gl.constexpr = acc.shape[1]
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        out = acc / gl.where(l_o > 0, l_o, 1.0)[:, None]
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        if PV != FLOAT:  # undo V's scale, add back the shift the prep pass removed
            v_shift = gl.load(vshift_ptr + d, mask=d < DIM, other=0.0)
            out = out * v_scale + v_shift[None, :]
        out = gl.where((n_keys > 0) & (l_o > 0)[:, None], out, 0.0)  # a row that saw no key outputs 0
        is_text = tile < n_text_tiles
        pos = (
            gl.where(is_text, tile, tile - n_text_tiles) * BLOCK
            + row0
            + gl.arange(0, 64, layout=gl.SliceLayout(1, o_layout))
        )
        valid = pos < gl.where(is_text, T, N)
        token = gl.load(perm_h + gl.where(valid & ~is_text, pos, 0))
        original = gl.where(is_text, text_base + pos, vis_base + token).to(gl.int64)
        gl.store(
            o_ptr + original[:, None] * stride_qs + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=valid[:, None] & (d[None, :] < DIM),
        )

    @gluon.jit
    def _consumer(
        c: gl.constexpr,
        q_smem,
        k_smem,
        v_smem,
        kv_ready,
        kv_empty,
        turn,
        kscale_ptr,
        vscale_ptr,
        list_ptr,
        is_text,
        n_text_tiles,
        n_keys,
        n_tiles,
        score_scale,
        T,
        N,
        tile,
        o_ptr,
        vshift_ptr,
        perm_h,
        text_base,
        vis_base,
        stride_qs,
        QK: gl.constexpr,
        PV: gl.constexpr,
        P_SHIFT: gl.constexpr,
        STAGES: gl.constexpr,
        DIM: gl.constexpr,
    ):
        """Consumer c's rows: the online softmax, then the store."""
        acc, l_i, v_scale = _consume(
            c,
            q_smem,
            k_smem,
            v_smem,
            kv_ready,
            kv_empty,
            turn,
            kscale_ptr,
            vscale_ptr,
            list_ptr,
            is_text,
            n_text_tiles,
            n_keys,
            n_tiles,
            score_scale,
            T,
            N,
            QK,
            PV,
            P_SHIFT,
            STAGES,
        )
        _store(
            acc,
            l_i,
            v_scale,
            c * 64,
            n_keys,
            tile,
            n_text_tiles,
            T,
            N,
            o_ptr,
            vshift_ptr,
            perm_h,
            text_base,
            vis_base,
            stride_qs,
            k_smem.shape[1],
            PV,
            DIM,
        )

    @gluon.jit
    def _paro_attention_sm90(
        Q,
        k_desc,
        v_desc,
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
        H,
        T,
        N,
        n_text_tiles,
        nb,
        score_scale,
        text_first,
        HEAD_DIM: gl.constexpr,
        DIM: gl.constexpr,
        QK: gl.constexpr,
        QK_QMAX: gl.constexpr,
        PV: gl.constexpr,
        MIN_AMAX_: gl.constexpr,
        P_SHIFT: gl.constexpr,
        STAGES: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """One program: one query tile of one (batch, head), in the portable kernel's launch
        order (text query tiles of every head first). QK, PV: formats.CODE's codes (PV not
        INT). Out has Q's layout and strides; channels are contiguous."""
        BLOCK: gl.constexpr = k_desc.block_shape[0]
        n_tiles = n_text_tiles + nb
        tile, bh = program_tile(
            gl.program_id(0) + gl.program_id(1).to(gl.int64) * n_tiles, n_text_tiles, nb, gl.num_programs(1)
        )
        b = bh // H
        h = bh % H
        perm_h = Perm + h.to(gl.int64) * N
        text_base = (1 - text_first) * N  # original position of the first text / visual token
        vis_base = text_first * T

        # The query tile through the head's order, quantised in registers (divided by the
        # balance, then one scale per consumer's 64 rows, quant.QUERY_SCALE_ROWS), into shared
        # memory: before the fork.
        ql: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_DIM // 8), HEAD_DIM // 8], [num_warps, 1], [1, 0])
        is_text = tile < n_text_tiles
        pos = gl.where(is_text, tile, tile - n_text_tiles) * BLOCK + gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ql))
        valid = pos < gl.where(is_text, T, N)
        token = gl.load(perm_h + gl.where(valid & ~is_text, pos, 0))
        original = gl.where(is_text, text_base + pos, vis_base + token)
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ql))
        q_base = Q + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh
        q = gl.load(
            q_base + original[:, None].to(gl.int64) * stride_qs + d[None, :],
            mask=valid[:, None] & (d[None, :] < DIM),
            other=0.0,
        )
        score_scale0 = score_scale  # consumer 0's, rows [0, 64)
        score_scale1 = score_scale  # consumer 1's, rows [64, 128)
        if QK != FLOAT:  # Q / a (quant.channel_balance; the prep pass multiplied K by a)
            inv_a = 1.0 / gl.load(Balance + bh.to(gl.int64) * DIM + d, mask=d < DIM, other=1.0)
            q32 = q.to(gl.float32) * inv_a[None, :]
            row_amax = gl.max(gl.abs(q32), 1)
            first = gl.arange(0, BLOCK, layout=gl.SliceLayout(1, ql)) < 64
            q_scale0 = gl.maximum(gl.max(gl.where(first, row_amax, 0.0), 0), MIN_AMAX_) / QK_QMAX
            q_scale1 = gl.maximum(gl.max(gl.where(first, 0.0, row_amax), 0), MIN_AMAX_) / QK_QMAX
            q32 = gl.minimum(gl.maximum(q32 / gl.where(first, q_scale0, q_scale1)[:, None], -QK_QMAX), QK_QMAX)
            if QK == INT:
                q32 = (q32 + 12582912.0) - 12582912.0  # round half to even, as torch.round
            score_scale0 = score_scale * q_scale0
            score_scale1 = score_scale * q_scale1
            q = q32
        q_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK, HEAD_DIM], k_desc.layout, q.to(k_desc.dtype))
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_shape, v_desc.layout)
        kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(kv_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)  # one arrival per consumer
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        fence_async_shared()

        vis_tile = gl.where(is_text, 0, tile - n_text_tiles)
        list_ptr = KvIndex + (h.to(gl.int64) * nb + vis_tile) * nb
        n_keys = n_text_tiles + gl.where(is_text, nb, gl.load(KvCount + h.to(gl.int64) * nb + vis_tile))
        kscale_ptr = KScale + bh.to(gl.int64) * n_tiles
        vscale_ptr = VScale + bh.to(gl.int64) * n_tiles
        o_ptr = Out + b.to(gl.int64) * stride_qb + h.to(gl.int64) * stride_qh
        vshift_ptr = VShift + bh.to(gl.int64) * DIM
        # Consumer 0 runs in the program's own warps (the default partition), consumer 1 and the
        # producer in workers. (Gluon passes constexprs to partitions only when they are spelled
        # out in the tuple.)
        gl.warp_specialize(
            [
                (
                    _consumer,
                    (
                        0,
                        q_smem,
                        k_smem,
                        v_smem,
                        kv_ready,
                        kv_empty,
                        turn,
                        kscale_ptr,
                        vscale_ptr,
                        list_ptr,
                        is_text,
                        n_text_tiles,
                        n_keys,
                        n_tiles,
                        score_scale0,
                        T,
                        N,
                        tile,
                        o_ptr,
                        vshift_ptr,
                        perm_h,
                        text_base,
                        vis_base,
                        stride_qs,
                        QK,
                        PV,
                        P_SHIFT,
                        STAGES,
                        DIM,
                    ),
                ),
                (
                    _consumer,
                    (
                        1,
                        q_smem,
                        k_smem,
                        v_smem,
                        kv_ready,
                        kv_empty,
                        turn,
                        kscale_ptr,
                        vscale_ptr,
                        list_ptr,
                        is_text,
                        n_text_tiles,
                        n_keys,
                        n_tiles,
                        score_scale1,
                        T,
                        N,
                        tile,
                        o_ptr,
                        vshift_ptr,
                        perm_h,
                        text_base,
                        vis_base,
                        stride_qs,
                        QK,
                        PV,
                        P_SHIFT,
                        STAGES,
                        DIM,
                    ),
                ),
                (
                    _produce,
                    (
                        k_desc,
                        v_desc,
                        k_smem,
                        v_smem,
                        kv_ready,
                        kv_empty,
                        list_ptr,
                        is_text,
                        n_text_tiles,
                        n_keys,
                        n_tiles,
                        bh * n_tiles * BLOCK,
                        bh * HEAD_DIM,
                        PV,
                        STAGES,
                    ),
                ),
            ],
            [4, 1],
            [240, 24],
        )


def _tile_layout(shape, element_bits):
    """Shared-memory layout of a TMA tile: the widest swizzle its rows allow."""
    return gl.NVMMASharedLayout(
        swizzle_byte_width=min(128, shape[-1] * element_bits // 8), element_bitwidth=element_bits, rank=2
    )


def _descriptor(buffer: torch.Tensor, block_shape: list[int]):
    """TMA descriptor of a prep-pass buffer seen as 2-D (all rows, its last axis)."""
    flat = buffer.reshape(-1, buffer.shape[-1])
    return TensorDescriptor.from_tensor(flat, block_shape, _tile_layout(block_shape, buffer.element_size() * 8))


def launch(
    q,
    kp,
    vp,
    out,
    perm,
    kv_index,
    kv_count,
    k_scale,
    v_scale,
    v_shift,
    balance,
    *,
    heads,
    t,
    n,
    n_text_tiles,
    nb,
    score_scale,
    text_first,
    dim,
    qk_code,
    qk_qmax,
    pv_code,
    min_amax,
    p_shift,
):
    """Launch on the prep pass's buffers: kp (B, H, rows, HEAD_DIM); vp the same when 16-bit,
    (B, H, HEAD_DIM, rows) when 8-bit; balance (B, H, DIM), which 8-bit QK divides Q by. Same
    scalar arguments as the portable kernel."""
    head_dim = kp.shape[-1]
    k_desc = _descriptor(kp, [BLOCK, head_dim])
    v_desc = _descriptor(vp, [head_dim, BLOCK] if pv_code != formats.FLOAT else [BLOCK, head_dim])
    _paro_attention_sm90[(n_text_tiles + nb, q.shape[0] * heads)](
        q,
        k_desc,
        v_desc,
        out,
        perm,
        kv_index,
        kv_count,
        k_scale,
        v_scale,
        v_shift,
        balance,
        q.stride(0),
        q.stride(2),
        q.stride(1),
        heads,
        t,
        n,
        n_text_tiles,
        nb,
        score_scale,
        text_first,
        HEAD_DIM=head_dim,
        DIM=dim,
        QK=qk_code,
        QK_QMAX=qk_qmax,
        PV=pv_code,
        MIN_AMAX_=min_amax,
        P_SHIFT=p_shift,
        STAGES=stages(head_dim, kp.element_size(), vp.element_size()),
        num_warps=4,
    )
