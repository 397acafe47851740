"""Which tiles an attention program visits: scalar Triton code shared by the portable kernel
(triton_attention.py) and the Hopper kernel (hopper_attention.py, whose Gluon code calls
`triton.jit` functions too)."""

import triton
import triton.language as tl


@triton.jit
def program_tile(pid, n_text_tiles, nb, n_programs_per_tile):
    """(query tile, batch * heads + head) of program `pid`, programs numbered in launch order.

    Programs run in launch order, and a text query tile visits every key tile, several times a
    sparse visual tile's work: so the text tiles of all heads come first, then each head's
    visual tiles together (they share its K and V in L2). Launched last, a head's text tiles
    would run alone at the end of the grid. n_programs_per_tile: batch * heads."""
    n_text_programs = n_text_tiles * n_programs_per_tile
    heavy = pid < n_text_programs
    rest = pid - n_text_programs
    tile = tl.where(heavy, pid % tl.maximum(n_text_tiles, 1), n_text_tiles + rest % nb).to(tl.int32)
    bh = tl.where(heavy, pid // tl.maximum(n_text_tiles, 1), rest // nb).to(tl.int32)
    return tile, bh


@triton.jit
def key_tile(j, n_text_tiles, list_ptr, is_text):
    """The paro-order tile of the j-th key tile a query tile visits: every text tile, then every
    visual tile (text queries) or the visual tiles of its kept list."""
    listed = j >= n_text_tiles
    entry = tl.load(list_ptr + tl.where(listed, j - n_text_tiles, 0), mask=listed & ~is_text, other=0)
    return tl.where(listed & ~is_text, n_text_tiles + entry, j)
