"""tile_order's Triton device functions, called from tiny wrapper kernels, against Python oracles."""

import os

import pytest
import torch
import triton
import triton.language as tl

from paro_kernels.tile_order import key_tile, program_tile, swizzle, swizzled_columns

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
POISON = 1000  # kept-list entries past the count: a tile number no read may return


@triton.jit
def program_tile_kernel(Tile, Bh, n_text_tiles, nb, n_programs_per_tile):
    pid = tl.program_id(0)
    tile, bh = program_tile(pid, n_text_tiles, nb, n_programs_per_tile)
    tl.store(Tile + pid, tile)
    tl.store(Bh + pid, bh)


@triton.jit
def key_tile_kernel(Out, KvIndex, KvCount, n_text_tiles, nb):
    """Row `tile` of Out: the key tiles query tile `tile` (paro order) visits, as the attention kernel walks them."""
    tile = tl.program_id(0)
    is_text = tile < n_text_tiles
    vis_tile = tl.where(is_text, 0, tile - n_text_tiles)
    list_ptr = KvIndex + vis_tile * nb
    n_keys = n_text_tiles + tl.where(is_text, nb, tl.load(KvCount + vis_tile))
    for j in range(0, n_keys):
        tl.store(Out + tile * (n_text_tiles + nb) + j, key_tile(j, n_text_tiles, list_ptr, is_text))


@triton.jit
def swizzle_kernel(Out, N: tl.constexpr):
    key = tl.arange(0, N)
    tl.store(Out + key, swizzle(key))


@triton.jit
def swizzled_columns_kernel(P, Out, R: tl.constexpr, C: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    tl.store(Out + offs, swizzled_columns(tl.load(P + offs)))


def run_program_tile(n_text_tiles, nb, bh):
    n = (n_text_tiles + nb) * bh
    tile, head = (torch.full((n,), -1, dtype=torch.int32, device=DEVICE) for _ in range(2))
    program_tile_kernel[(n,)](tile, head, n_text_tiles, nb, bh)
    return list(zip(tile.tolist(), head.tolist(), strict=True))


def swizzle_oracle(key):
    """Bit by bit: bit 3 -> 1, bit 2 -> 3, bit 1 -> 2; bit 0 and bits from 4 up stay."""
    out = key & ~0xE
    for src, dst in ((3, 1), (2, 3), (1, 2)):
        out |= ((key >> src) & 1) << dst
    return out


@pytest.mark.parametrize("n_text_tiles,nb,bh", [(0, 4, 3), (2, 5, 6), (3, 1, 2), (1, 7, 1)])
def test_program_tile_runs_all_text_tiles_first_then_each_heads_visual_tiles_together(n_text_tiles, nb, bh):
    visits = run_program_tile(n_text_tiles, nb, bh)
    everything = [(t, h) for t in range(n_text_tiles + nb) for h in range(bh)]
    assert sorted(visits) == sorted(everything)  # every (tile, bh) exactly once
    n_text_programs = n_text_tiles * bh
    assert all(t < n_text_tiles for t, _ in visits[:n_text_programs])
    visual_heads = [h for _, h in visits[n_text_programs:]]
    runs = [h for i, h in enumerate(visual_heads) if i == 0 or visual_heads[i - 1] != h]
    assert sorted(runs) == list(range(bh))  # one contiguous run of programs per head


def test_program_tile_example():
    assert run_program_tile(1, 2, 2) == [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (2, 1)]


def hand_kept_lists(kept):
    """(index, count) as the kernels read them, built by hand; entries past the count are poison."""
    nb = kept.shape[0]
    index = torch.full((nb, nb), POISON, dtype=torch.int32)
    for v in range(nb):
        listed = [c for c in range(nb) if kept[v, c]]
        index[v, : len(listed)] = torch.tensor(listed, dtype=torch.int32)
    return index, kept.sum(dim=-1, dtype=torch.int32)


@pytest.mark.parametrize("n_text_tiles", [0, 1, 3])
def test_key_tile_visits_text_tiles_then_the_kept_list_or_every_tile(n_text_tiles):
    nb = 5
    kept = torch.rand(nb, nb, generator=torch.Generator().manual_seed(n_text_tiles)) < 0.5
    kept[1], kept[2] = False, True  # a visual query tile that keeps nothing, one that keeps everything
    kept[3] = torch.tensor([False, True, False, False, True])
    index, count = hand_kept_lists(kept)
    n_tiles = n_text_tiles + nb
    out = torch.full((n_tiles, n_tiles), -1, dtype=torch.int32, device=DEVICE)
    key_tile_kernel[(n_tiles,)](out, index.to(DEVICE), count.to(DEVICE), n_text_tiles, nb)
    text = list(range(n_text_tiles))
    for tile in range(n_tiles):
        if tile < n_text_tiles:
            expect = list(range(n_tiles))  # a text query sees every tile, the list unread
        else:
            expect = text + [n_text_tiles + c for c in range(nb) if kept[tile - n_text_tiles, c]]
        assert out[tile].tolist() == expect + [-1] * (n_tiles - len(expect)), f"query tile {tile}"
    assert out[n_text_tiles + 3, n_text_tiles : n_text_tiles + 2].tolist() == [n_text_tiles + 1, n_text_tiles + 4]


def test_swizzle_matches_the_bit_moves_and_permutes_within_groups_of_16():
    out = torch.empty(256, dtype=torch.int32, device=DEVICE)
    swizzle_kernel[(1,)](out, N=256)
    got = out.tolist()
    assert got == [swizzle_oracle(k) for k in range(256)]
    for group in range(0, 256, 16):
        assert sorted(got[group : group + 16]) == list(range(group, group + 16))
    assert [got[k] for k in (0, 1, 2, 4, 8, 14, 15, 16 + 8)] == [0, 1, 4, 8, 2, 14, 15, 16 + 2]


@pytest.mark.parametrize("rows,cols", [(16, 32), (16, 64), (32, 64)])
def test_swizzled_columns_moves_column_c_to_swizzle_c(rows, cols):
    p = (torch.arange(rows)[:, None] * 1000 + torch.arange(cols)[None, :]).float()  # values encode (row, column)
    out = torch.full_like(p, -1.0, device=DEVICE)
    swizzled_columns_kernel[(1,)](p.to(DEVICE), out, R=rows, C=cols)
    expect = torch.empty_like(p)
    for c in range(cols):
        expect[:, swizzle_oracle(c)] = p[:, c]
    assert torch.equal(out.cpu(), expect)
