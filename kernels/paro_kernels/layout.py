"""The sequence layout the attention kernels and statistics agree on.

A self-attention call sees S = T + N tokens: T text tokens (a prefix or a suffix, possibly 0)
and N visual tokens. Internally every paro attention works on "paro order": text first, then
the visual tokens gathered into the head's order. Blocks of `block` rows tile the visual part
only, starting at its first token; text rows and columns are always attended densely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceLayout:
    text_len: int = 0
    text_first: bool = True

    def visual_len(self, seq_len: int) -> int:
        return seq_len - self.text_len

    def split(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, visual) parts of x along `dim`."""
        n = x.shape[dim] - self.text_len
        if self.text_first:
            text, visual = x.split([self.text_len, n], dim=dim)
        else:
            visual, text = x.split([n, self.text_len], dim=dim)
        return text, visual

    def join(self, text: torch.Tensor, visual: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([text, visual] if self.text_first else [visual, text], dim=dim)


def num_blocks(n: int, block: int) -> int:
    return math.ceil(n / block)


def chunk_rows(max_chunk_elems: int, bsz: int, heads: int, seq: int, block: int) -> int:
    """Query rows per chunk (whole blocks) so that one chunk of scores holds about
    `max_chunk_elems` numbers: what bounds the plain-torch paths' memory."""
    return max(block, (max_chunk_elems // max(1, bsz * heads * seq)) // block * block)


def gather_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) with row h's tokens taken in the order perm[h] (perm is (H, N))."""
    b, h, n, d = x.shape
    return x.gather(2, perm.to(x.device)[None, :, :, None].expand(b, h, n, d))


def visual_rows(layout: SequenceLayout, perm: torch.Tensor) -> torch.Tensor:
    """Where head h's visual token in paro position j lives in diffusers' (B, S, H, D) seen as
    (B, S * H, D): row (first visual + perm[h, j]) * H + h, as an (H, N) long tensor."""
    heads = perm.shape[0]
    first = layout.text_len if layout.text_first else 0
    head = torch.arange(heads, device=perm.device)[:, None]
    return (perm.long() + first) * heads + head


def to_paro_order(
    x: torch.Tensor, layout: SequenceLayout, perm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' (B, S, H, D) -> (text, permuted visual), each (B, H, len, D).

    The permuted visual part is one index_select of whole rows of D numbers (visual_rows): a
    per-element gather over the transposed view costs several times more."""
    text, visual = layout.split(x.transpose(1, 2), dim=2)
    if perm is not None:
        b, s, h, d = x.shape
        rows = visual_rows(layout, perm.to(x.device)).reshape(-1)
        visual = x.reshape(b, s * h, d).index_select(1, rows).view(b, h, -1, d)
    return text, visual


def block_mask_rows(kept: torch.Tensor, block: int, n: int, first_block: int, rows: int) -> torch.Tensor:
    """Element mask (H, rows, n) of visual query rows starting at block `first_block`."""
    row_blocks = torch.arange(first_block * block, first_block * block + rows, device=kept.device) // block
    col_blocks = torch.arange(n, device=kept.device) // block
    return kept[:, row_blocks][:, :, col_blocks]


def kept_block_lists(kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block masks as the kernels read them: (..., nb, nb) bool -> per query tile the kept key
    tiles first, ascending (int32 (..., nb, nb)), and how many there are (int32 (..., nb))."""
    index = torch.sort((~kept).to(torch.uint8), dim=-1, stable=True).indices
    return index.to(torch.int32), kept.sum(dim=-1, dtype=torch.int32)
