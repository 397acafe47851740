"""Calibration statistics of softmax(Q K^T) in candidate token orders, streamed.

For each candidate order o and head h, with P = softmax(Q K^T * scale) over all keys (text
included) and the visual part tiled into blocks of `block` tokens in that order:
  mass[o, h, i, j]     sum of P over visual block (i, j), averaged over the batch
  incoherence[o, h]    max P / mean P within a visual block, averaged over blocks and batch:
                       what a per-block quantisation scale suffers from (1 for a flat block)
Only visual query rows are profiled: text rows are always computed densely.

Two implementations of the same numbers: plain torch (CPU, and the oracle) holds one chunk of
query rows at a time; on CUDA, kernels/paro_kernels/triton_stats.py streams tile by tile, computing each
row's log-sum-exp once for all orders (it does not depend on the order) and then one block
pass per order. Neither ever holds the N x N map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import SequenceLayout, chunk_rows, num_blocks, to_paro_order


@dataclass
class BlockStatistics:
    mass: torch.Tensor  # (O, H, nb, nb) float32
    incoherence: torch.Tensor  # (O, H) float32


def summarise(mass: torch.Tensor, peak: torch.Tensor, n: int, block: int) -> BlockStatistics:
    """Raw per-sample block sums and maxima (O, B, H, nb, nb) -> batch-averaged statistics."""
    nb = mass.shape[-1]
    sizes = torch.full((nb,), float(block), device=mass.device)
    sizes[-1] = n - (nb - 1) * block  # the ragged last block holds fewer tokens
    mean = mass / (sizes[:, None] * sizes[None, :])
    ratio = torch.where(mean > 0, peak / mean, torch.ones_like(mean))
    return BlockStatistics(mass=mass.mean(dim=1), incoherence=ratio.mean(dim=(1, 3, 4)))


def _torch_raw(q, k, perm, block, layout, scale, max_chunk_elems):
    bsz, seq, heads, _ = q.shape
    n = layout.visual_len(seq)
    nb = num_blocks(n, block)
    pad = nb * block - n
    _, qv = to_paro_order(q.float() * scale, layout, perm)  # scaled here: one pass less over the scores
    kt, kv = to_paro_order(k.float(), layout, perm)
    keys = torch.cat([kt, kv], dim=2)
    mass = torch.zeros(bsz, heads, nb, nb, device=q.device)
    peak = torch.zeros(bsz, heads, nb, nb, device=q.device)
    rows = chunk_rows(max_chunk_elems, bsz, heads, seq, block)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        p = torch.softmax(qv[:, :, start:stop] @ keys.transpose(-1, -2), dim=-1)[..., layout.text_len :]
        row_pad = -(stop - start) % block
        if pad or row_pad:  # a copy of the whole chunk: only for ragged sizes
            p = torch.nn.functional.pad(p, (0, pad, 0, row_pad))
        tiles = p.reshape(bsz, heads, p.shape[2] // block, block, nb, block)
        i0 = start // block
        mass[:, :, i0 : i0 + tiles.shape[2]] = tiles.sum(dim=(3, 5))
        peak[:, :, i0 : i0 + tiles.shape[2]] = tiles.amax(dim=(3, 5))
    return mass, peak


def block_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    perms: torch.Tensor,
    block: int,
    layout: SequenceLayout = SequenceLayout(),
    scale: float | None = None,
    max_chunk_elems: int = 1 << 24,
    use_triton: bool | None = None,
) -> BlockStatistics:
    """q, k: (B, S, H, D) post-RoPE; perms: (O, H, N), each head's visual order per candidate.

    use_triton: None picks the Triton kernels for CUDA tensors, torch otherwise.
    """
    n = layout.visual_len(q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_triton is None:
        use_triton = q.is_cuda
    if use_triton:
        from .triton_stats import raw_block_statistics

        mass, peak = raw_block_statistics(q, k, perms, block, layout, scale)
    else:
        raw = [_torch_raw(q, k, p, block, layout, scale, max_chunk_elems) for p in perms]
        mass, peak = torch.stack([m for m, _ in raw]), torch.stack([p for _, p in raw])
    return summarise(mass, peak, n, block)


def mass_recall(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Share of each head's visual mass inside its top `density` fraction of blocks.

    mass (..., nb, nb) -> (...,).
    """
    flat = mass.flatten(-2)
    keep = max(1, round(density * flat.shape[-1]))
    top = flat.topk(keep, dim=-1).values.sum(dim=-1)
    return top / flat.sum(dim=-1).clamp_min(torch.finfo(flat.dtype).tiny)
