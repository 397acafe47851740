"""Which tiles an attention program visits, and where a key sits in a swizzled V tile: Triton
code shared by the portable kernel (triton_attention.py) and the Hopper kernel
(hopper_attention.py, whose Gluon code calls `triton.jit` functions too)."""

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


@triton.jit
def swizzle(key):
    """Position of a tile's key in a swizzled V tile: bits 3, 2, 1 of its index move to 1, 3,
    2 (keys move within groups of 16). On sm_90 that is where the score accumulator's
    registers already hold the key's column for an 8-bit wgmma operand."""
    return (key & ~0xE) | ((key & 0x6) << 1) | ((key >> 2) & 0x2)


@triton.jit
def swizzled_columns(p):
    """P with column c moved to swizzle(c), written as a reshape and a permute of the bits so
    that Triton (and Gluon) sees no data move: P then feeds an 8-bit product with a swizzled V
    without the register shuffles that its accumulator-to-operand layout change costs otherwise."""
    R: tl.constexpr = p.shape[0]
    C: tl.constexpr = p.shape[1]
    p = tl.permute(tl.reshape(p, [R, C // 32, 2, 2, 2, 2, 2]), (0, 1, 2, 4, 5, 3, 6))
    return tl.reshape(p, [R, C])
