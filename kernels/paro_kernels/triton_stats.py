"""Calibration statistics in Triton: block mass and peak of softmax(Q K^T), tile by tile.

Pass 1 (`_row_lse_kernel`, once per call): each visual query row's base-2 log-sum-exp over all
keys, text included. It does not depend on the token order, so all candidate orders share it.
Pass 2 (`_block_mass_kernel`, one grid axis per candidate order): for a query tile in that
order, every visual key tile's P = exp2(s - lse) is reduced to its sum and its maximum. Only
(B, H, nb, nb) numbers per order are written; the N x N map never exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import SequenceLayout, num_blocks
from .triton_attention import INTERPRET, LOG2E, _gather_tile, padded_head_dim


@triton.jit
def _row_lse_kernel(
    Q,
    K,
    Lse,
    Ident,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
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
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)  # visual query tile, arrival order
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    text_base = (1 - text_first) * N
    vis_base = text_first * T
    base = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q, original, valid = _gather_tile(
        Q + base,
        n_text_tiles + tile,
        n_text_tiles,
        T,
        N,
        Ident,
        offs,
        d,
        text_base,
        vis_base,
        stride_qs,
        stride_qd,
        BLOCK,
        DIM,
        HEAD_DIM,
        UPCAST,
    )
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    for t in range(0, n_text_tiles + nb):
        k, k_original, k_valid = _gather_tile(
            K + base,
            t,
            n_text_tiles,
            T,
            N,
            Ident,
            offs,
            d,
            text_base,
            vis_base,
            stride_qs,
            stride_qd,
            BLOCK,
            DIM,
            HEAD_DIM,
            UPCAST,
        )
        s = tl.where(k_valid[None, :], tl.dot(q, tl.trans(k)) * score_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    pos = tile * BLOCK + offs
    tl.store(Lse + bh.to(tl.int64) * N + pos, m_i + tl.math.log2(l_i), mask=valid)


@triton.jit
def _block_mass_kernel(
    Q,
    K,
    Lse,
    Perms,
    Mass,
    Peak,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    B,
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
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)  # visual query tile in the candidate's order
    bh = tl.program_id(1)
    o = tl.program_id(2)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    perm_h = Perms + (o.to(tl.int64) * H + h) * N
    text_base = (1 - text_first) * N
    vis_base = text_first * T
    base = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q, original, valid = _gather_tile(
        Q + base,
        n_text_tiles + tile,
        n_text_tiles,
        T,
        N,
        perm_h,
        offs,
        d,
        text_base,
        vis_base,
        stride_qs,
        stride_qd,
        BLOCK,
        DIM,
        HEAD_DIM,
        UPCAST,
    )
    lse = tl.load(Lse + bh.to(tl.int64) * N + (original - vis_base), mask=valid, other=float("inf"))
    out = ((o.to(tl.int64) * B + b) * H + h) * nb * nb + tile * nb
    for j in range(0, nb):
        k, k_original, k_valid = _gather_tile(
            K + base,
            n_text_tiles + j,
            n_text_tiles,
            T,
            N,
            perm_h,
            offs,
            d,
            text_base,
            vis_base,
            stride_qs,
            stride_qd,
            BLOCK,
            DIM,
            HEAD_DIM,
            UPCAST,
        )
        s = tl.dot(q, tl.trans(k)) * score_scale
        p = tl.where(valid[:, None] & k_valid[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        tl.store(Mass + out + j, tl.sum(tl.sum(p, 1), 0))
        tl.store(Peak + out + j, tl.max(tl.max(p, 1), 0))


def raw_block_statistics(
    q: torch.Tensor, k: torch.Tensor, perms: torch.Tensor, block: int, layout: SequenceLayout, scale: float
):
    """(mass, peak), each (O, B, H, nb, nb) float32, for q, k (B, S, H, D) and perms (O, H, N)."""
    bsz, seq, heads, dim = q.shape
    t = layout.text_len
    n = seq - t
    nb = num_blocks(n, block)
    n_text_tiles = num_blocks(t, block)
    orders = perms.shape[0]
    perms = perms.to(q.device).contiguous()
    ident = torch.arange(n, device=q.device)
    lse = torch.empty(bsz, heads, n, device=q.device, dtype=torch.float32)
    mass = torch.empty(orders, bsz, heads, nb, nb, device=q.device, dtype=torch.float32)
    peak = torch.empty_like(mass)
    sq = q.stride()
    common = dict(
        BLOCK=block,
        HEAD_DIM=padded_head_dim(dim),
        DIM=dim,
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        **({"num_warps": 1, "num_stages": 1} if INTERPRET else {"num_warps": 4, "num_stages": 3}),
    )
    score_scale = scale * LOG2E
    _row_lse_kernel[(nb, bsz * heads)](
        q,
        k,
        lse,
        ident,
        sq[0],
        sq[1],
        sq[2],
        sq[3],
        heads,
        t,
        n,
        n_text_tiles,
        nb,
        score_scale,
        int(layout.text_first),
        **common,
    )
    _block_mass_kernel[(nb, bsz * heads, orders)](
        q,
        k,
        lse,
        perms,
        mass,
        peak,
        sq[0],
        sq[1],
        sq[2],
        sq[3],
        bsz,
        heads,
        t,
        n,
        n_text_tiles,
        nb,
        score_scale,
        int(layout.text_first),
        **common,
    )
    return mass, peak
