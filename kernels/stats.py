"""Calibration statistics of softmax(Q K^T) in a given token order, streamed (plain torch).

For each head, with P = softmax(Q K^T * scale) over all keys (text included) and the visual
part tiled into blocks of `block` tokens in the head's order:
  mass[h, i, j]     sum of P over visual block (i, j), averaged over the batch
  incoherence[h]    max P / mean P within a visual block, averaged over blocks and batch: what
                    a per-block quantisation scale suffers from (1 for a flat block)
Only visual query rows are profiled: text rows are always computed densely.

Query rows go in chunks, so memory stays at one chunk of scores, never the N x N map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import SequenceLayout, num_blocks, to_paro_order


@dataclass
class BlockStatistics:
    mass: torch.Tensor  # (H, nb, nb) float32
    incoherence: torch.Tensor  # (H,) float32


def block_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    perm: torch.Tensor | None,
    block: int,
    layout: SequenceLayout = SequenceLayout(),
    scale: float | None = None,
    max_chunk_elems: int = 1 << 24,
) -> BlockStatistics:
    """q, k: (B, S, H, D) post-RoPE; perm: (H, N) per-head visual order or None."""
    bsz, seq, heads, dim = q.shape
    n = layout.visual_len(seq)
    nb = num_blocks(n, block)
    pad = nb * block - n
    scale = dim**-0.5 if scale is None else scale
    _, qv = to_paro_order(q.float(), layout, perm)
    kt, kv = to_paro_order(k.float(), layout, perm)
    keys = torch.cat([kt, kv], dim=2)
    t = layout.text_len

    # Entries per block: the ragged last block row/column holds fewer tokens.
    sizes = torch.full((nb,), float(block), device=q.device)
    sizes[-1] = n - (nb - 1) * block
    count = sizes[:, None] * sizes[None, :]

    mass = torch.zeros(bsz, heads, nb, nb, device=q.device)
    peak = torch.zeros(bsz, heads, nb, nb, device=q.device)
    rows = max(block, (max_chunk_elems // max(1, bsz * heads * seq)) // block * block)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        p = torch.softmax((qv[:, :, start:stop] @ keys.transpose(-1, -2)) * scale, dim=-1)[..., t:]
        row_pad = -(stop - start) % block
        p = torch.nn.functional.pad(p, (0, pad, 0, row_pad))
        tiles = p.reshape(bsz, heads, p.shape[2] // block, block, nb, block)
        i0 = start // block
        mass[:, :, i0 : i0 + tiles.shape[2]] = tiles.sum(dim=(3, 5))
        peak[:, :, i0 : i0 + tiles.shape[2]] = tiles.amax(dim=(3, 5))
    mean = mass / count
    ratio = torch.where(mean > 0, peak / mean, torch.ones_like(mean))
    return BlockStatistics(mass=mass.mean(dim=0), incoherence=ratio.mean(dim=(0, 2, 3)))


def mass_recall(mass: torch.Tensor, density: float) -> torch.Tensor:
    """Share of each head's visual mass inside its top `density` fraction of blocks: (H,)."""
    flat = mass.flatten(1)
    keep = max(1, round(density * flat.shape[1]))
    top = flat.topk(keep, dim=1).values.sum(dim=1)
    return top / flat.sum(dim=1).clamp_min(torch.finfo(flat.dtype).tiny)
