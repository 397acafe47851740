"""Calibration statistics of softmax(Q K^T) in candidate token orders, streamed.

For each candidate order o and head h, with P = softmax(Q K^T * scale) over all keys (text
included) and the visual part tiled into blocks of `block` tokens in that order:
  mass[o, h, i, j]     sum of P over visual block (i, j), as a share of its row block's visual
                       mass, the largest over the batch's samples (`summarise` says why)
  incoherence[o, h]    max P / mean P within a visual block, averaged over blocks and batch:
                       what a per-block quantisation scale suffers from (1 for a flat block)
Only visual query rows are profiled: text rows are always computed densely.

Two implementations of the same numbers; neither ever holds the N x N map:
- plain torch (CPU, and the oracle): P is computed once, in arrival order, one cache-sized piece
  of (batch x head, query rows) at a time, and every candidate order's blocks are summed from that
  one P. An order's block is a run of `block` positions of the order, so a union of aligned groups
  of g = gcd(block, size) tokens along its innermost axis: summing P over those groups once per
  innermost axis serves both orders that share it, and what is left is g times smaller than P:
  its sums go to blocks through one small 0/1 matrix product (every order of that axis at once),
  its maxima through a permutation. Rows go to their block in each order by index. Given V, the
  same P also gives the attention output, P V (a calibration run then needs no dense call).
- on CUDA, kernels/paro_kernels/triton_stats.py streams tile by tile, computing each row's
  log-sum-exp once for all orders (it does not depend on the order) and then one block pass per
  order.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .layout import SequenceLayout, num_blocks, to_paro_order
from .orders import VIDEO_AXES, head_permutations, inverse_permutation, order_permutation

# Scores one piece of the torch path holds: small enough for P to stay in cache while it is
# summed, which makes the pass about twice as fast on a CPU as pieces of all heads at once.
PIECE_ELEMS = 1 << 21


@dataclass
class BlockStatistics:
    mass: torch.Tensor  # (O, H, nb, nb) float32
    incoherence: torch.Tensor | None  # (O, H) float32; None when peaks were not asked for
    output: torch.Tensor | None = None  # softmax(Q K^T * scale) V (B, S, H, D), where V was given (torch path)


def row_shares(mass: torch.Tensor) -> torch.Tensor:
    """Block mass (..., nb, nb) as shares of its row block's mass: each row sums to 1 (or is 0)."""
    return mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)


def summarise(mass: torch.Tensor, peak: torch.Tensor | None, n: int, block: int) -> BlockStatistics:
    """Raw per-sample block sums and maxima (O, B, H, nb, nb) -> the statistics of the batch.

    The mass of a block is its largest share of its row block over the samples (prompts, CFG
    branches): a block counts as much as it matters to the sample that needs it most. A mean
    over samples keeps what all of them share and drops what each prompt's own content needs,
    which a static mask must still serve on prompts it never saw: on the demo model's held-out
    prompts the maximum gives the d=0.3 plan about 5 dB more than the mean (BENCHMARKS.md).
    The incoherence is the batch's mean."""
    share = row_shares(mass).amax(dim=1)
    if peak is None:
        return BlockStatistics(mass=share, incoherence=None)
    nb = mass.shape[-1]
    sizes = torch.full((nb,), float(block), device=mass.device)
    sizes[-1] = n - (nb - 1) * block  # the ragged last block holds fewer tokens
    mean = mass / (sizes[:, None] * sizes[None, :])
    ratio = torch.where(mean > 0, peak / mean, torch.ones_like(mean))
    return BlockStatistics(mass=share, incoherence=ratio.mean(dim=(1, 3, 4)))


def _axes(order: str) -> list[int]:
    """An order's axes as indices into (F, H, W), outermost first; an image order ("HW") gets F,
    of size 1, in front."""
    return [VIDEO_AXES.index(a) for a in order.rjust(3, "F")]


def _group_size(grid, inner: int, block: int) -> int:
    return math.gcd(block, grid[inner])


def _grouped(x: torch.Tensor, grid, inner: int, block: int, reduce) -> torch.Tensor:
    """x (..., F, H, W) -> (..., N / g): `reduce` over each aligned group of g tokens along axis
    `inner`, flattened in arrival order of the groups."""
    lead, g = x.dim() - 3, _group_size(grid, inner, block)
    return reduce(x.unflatten(lead + inner, (grid[inner] // g, g)), dim=lead + inner + 1).flatten(lead)


@functools.lru_cache(maxsize=16)
def _group_blocks(grid, orders: tuple[str, ...], block: int, device: torch.device) -> torch.Tensor:
    """(N / g, len(orders) * nb) 0/1 float32: column o * nb + j marks the groups (of
    `_grouped`, along the orders' shared innermost axis) that make up key block j of orders[o]."""
    inner = _axes(orders[0])[-1]
    g, n = _group_size(grid, inner, block), math.prod(grid)
    nb = num_blocks(n, block)
    sizes = list(grid)
    sizes[inner] //= g
    group_of_token = torch.arange(n // g).view(sizes).repeat_interleave(g, dim=inner).flatten()
    out = torch.zeros(n // g, len(orders) * nb)
    for i, order in enumerate(orders):
        position = inverse_permutation(order_permutation(order, grid))  # token -> its place in the order
        out[group_of_token, i * nb + position // block] = 1.0
    return out.to(device)


def _by_inner_axis(orders: list[str]) -> dict[int, tuple[str, ...]]:
    axes: dict[int, tuple[str, ...]] = {}
    for order in orders:
        axes[_axes(order)[-1]] = axes.get(_axes(order)[-1], ()) + (order,)
    return axes


def key_block_sums(p: torch.Tensor, grid, orders: list[str], block: int) -> dict[str, torch.Tensor]:
    """p (..., N) over visual keys in arrival order -> {order: (..., nb)}: the sum of p over each
    of the order's key blocks (see the module docstring)."""
    x, nb, out = p.unflatten(-1, tuple(grid)), num_blocks(math.prod(grid), block), {}
    for inner, same in _by_inner_axis(orders).items():
        sums = _grouped(x, grid, inner, block, torch.sum) @ _group_blocks(tuple(grid), same, block, p.device)
        out.update(zip(same, sums.split(nb, dim=-1)))
    return out


def key_block_maxima(p: torch.Tensor, grid, orders: list[str], block: int) -> dict[str, torch.Tensor]:
    """p (..., N) over visual keys in arrival order -> {order: (..., nb)}: the maximum of p over
    each of the order's key blocks (p >= 0)."""
    n, lead = math.prod(grid), p.dim() - 1
    nb, x, out = num_blocks(n, block), p.unflatten(-1, tuple(grid)), {}
    for inner, same in _by_inner_axis(orders).items():
        g = _group_size(grid, inner, block)
        sizes = list(grid)
        sizes[inner] //= g
        grouped = _grouped(x, grid, inner, block, torch.amax).unflatten(-1, sizes)
        for order in same:
            runs = grouped.permute(*range(lead), *(lead + a for a in _axes(order))).reshape(*p.shape[:-1], n // g)
            if n % block:  # the ragged last block: zeros count for nothing in a max of P >= 0
                runs = torch.nn.functional.pad(runs, (0, nb * block // g - n // g))
            out[order] = runs.unflatten(-1, (nb, block // g)).amax(dim=-1)
    return out


def _torch_raw(q, k, v, head_orders, grid, block, layout, scale, peaks, piece_elems):
    """(mass, peak or None, output or None): mass and peak {order: (B*H, nb, nb)}, head h's rows
    computed for the orders head_orders[h] names (a piece of several heads reduces the union),
    zero otherwise; with v, the attention output (B, S, H, D) in q's dtype."""
    bsz, seq, heads, dim = q.shape
    n = layout.visual_len(seq)
    nb = num_blocks(n, block)
    qt, qv = to_paro_order(q.float() * scale, layout, None)  # scaled here: one pass less over the scores
    kt, kv = to_paro_order(k.float(), layout, None)
    queries = qv.reshape(bsz * heads, n, dim)
    keys = torch.cat([kt, kv], dim=2).reshape(bsz * heads, seq, dim).transpose(1, 2)
    if v is not None:
        values = torch.cat(to_paro_order(v.float(), layout, None), dim=2).reshape(bsz * heads, seq, -1)
        visual_out = torch.empty(bsz * heads, n, values.shape[-1], device=q.device)
    orders = sorted(set().union(*head_orders))
    # each visual token's row block in each order
    row_block = {o: (inverse_permutation(order_permutation(o, grid)) // block).to(q.device) for o in orders}
    zeros = lambda: torch.zeros(bsz * heads, nb, nb, device=q.device)  # noqa: E731
    mass = {o: zeros() for o in orders}
    peak = {o: zeros() for o in orders} if peaks else None
    rows = max(1, min(n, piece_elems // seq))
    group = max(1, piece_elems // (rows * seq))
    for b0 in range(0, bsz * heads, group):
        b1 = min(bsz * heads, b0 + group)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            p = torch.softmax(queries[b0:b1, r0:r1] @ keys[b0:b1], dim=-1)
            if v is not None:
                torch.matmul(p, values[b0:b1], out=visual_out[b0:b1, r0:r1])
            p = p[..., layout.text_len :]
            needed = sorted(set().union(*(head_orders[bh % heads] for bh in range(b0, b1))))
            for o, sums in key_block_sums(p, grid, needed, block).items():
                mass[o][b0:b1].index_add_(1, row_block[o][r0:r1], sums)
            if peaks:
                for o, maxima in key_block_maxima(p, grid, needed, block).items():
                    index = row_block[o][r0:r1, None].expand_as(maxima)
                    peak[o][b0:b1].scatter_reduce_(1, index, maxima, "amax")
    if v is None:
        return mass, peak, None
    text_out = torch.softmax(qt.reshape(bsz * heads, -1, dim) @ keys, dim=-1) @ values
    output = layout.join(text_out, visual_out, dim=1).unflatten(0, (bsz, heads)).transpose(1, 2)
    return mass, peak, output.to(q.dtype)


def block_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    orders: list[list[str]],
    grid: tuple[int, int, int],
    block: int,
    layout: SequenceLayout = SequenceLayout(),
    scale: float | None = None,
    peaks: bool = True,
    piece_elems: int = PIECE_ELEMS,
    use_triton: bool | None = None,
) -> BlockStatistics:
    """q, k: (B, S, H, D) post-RoPE; orders: O candidates, each one order name per head.

    v: given, the torch path also returns the attention output from the same P (the Triton
    kernels do not: a GPU's dense attention is cheap beside them).
    peaks: whether to compute the incoherence (it needs each block's maximum as well as its sum).
    use_triton: None picks the Triton kernels for CUDA tensors, torch otherwise.
    """
    bsz, seq, heads, _ = q.shape
    n = layout.visual_len(seq)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_triton is None:
        use_triton = q.is_cuda
    if use_triton:
        from .triton_stats import raw_block_statistics

        perms = torch.stack([head_permutations(candidate, grid) for candidate in orders])
        mass, peak = raw_block_statistics(q, k, perms, block, layout, scale)
        return summarise(mass, peak if peaks else None, n, block)
    head_orders = [{candidate[h] for candidate in orders} for h in range(heads)]
    raw_mass, raw_peak, output = _torch_raw(q, k, v, head_orders, grid, block, layout, scale, peaks, piece_elems)

    def per_candidate(raw: dict[str, torch.Tensor]) -> torch.Tensor:
        nb = next(iter(raw.values())).shape[-1]
        by_order = {o: x.view(bsz, heads, nb, nb) for o, x in raw.items()}
        return torch.stack(
            [torch.stack([by_order[o][:, h] for h, o in enumerate(candidate)], dim=1) for candidate in orders]
        )

    stats = summarise(per_candidate(raw_mass), per_candidate(raw_peak) if peaks else None, n, block)
    stats.output = output
    return stats


def mass_recall(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Share of each head's visual mass inside its top `density` fraction of blocks.

    mass (..., nb, nb) -> (...,).
    """
    flat = mass.flatten(-2)
    keep = max(1, round(density * flat.shape[-1]))
    top = flat.topk(keep, dim=-1).values.sum(dim=-1)
    return top / flat.sum(dim=-1).clamp_min(torch.finfo(flat.dtype).tiny)
