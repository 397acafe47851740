"""The sequence layout helpers against explicit examples and plain-loop oracles."""

import pytest
import torch

from paro_kernels.layout import (
    SequenceLayout,
    block_mask_rows,
    chunk_rows,
    gather_tokens,
    kept_block_lists,
    num_blocks,
    to_paro_order,
)

LAYOUTS = [(0, True), (0, False), (3, True), (3, False)]


def token_ids(b, s, h, d):
    """(B, S, H, D) whose every element encodes its (b, s, h, d) coordinates."""
    return torch.arange(b * s * h * d, dtype=torch.float64).reshape(b, s, h, d)


def random_perms(heads, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(heads)])


@pytest.mark.parametrize(
    "n,block,expect", [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (105, 16, 7), (128, 128, 1)]
)
def test_num_blocks_rounds_up_to_whole_blocks(n, block, expect):
    assert num_blocks(n, block) == expect


@pytest.mark.parametrize("text_len,text_first", LAYOUTS)
def test_split_takes_text_from_the_right_end_and_join_puts_it_back(text_len, text_first):
    x = torch.arange(2 * 10 * 3).reshape(2, 10, 3)
    layout = SequenceLayout(text_len, text_first)
    assert layout.visual_len(10) == 10 - text_len
    text, visual = layout.split(x, dim=1)
    text_pos = list(range(text_len)) if text_first else list(range(10 - text_len, 10))
    visual_pos = [p for p in range(10) if p not in text_pos]
    assert torch.equal(text, x[:, text_pos])
    assert torch.equal(visual, x[:, visual_pos])
    assert torch.equal(layout.join(text, visual, dim=1), x)


def test_split_along_the_last_dim():
    x = torch.arange(24).reshape(2, 12)
    text, visual = SequenceLayout(5, text_first=False).split(x, dim=-1)
    assert torch.equal(text, x[:, 7:]) and torch.equal(visual, x[:, :7])


def test_default_layout_is_all_visual():
    layout = SequenceLayout()
    assert layout.text_len == 0 and layout.text_first
    assert layout.visual_len(37) == 37


def chunk_rows_oracle(max_elems, bsz, heads, seq, block):
    """The most whole blocks of rows whose scores fit in max_elems, at least one block."""
    rows = block
    while (rows + block) * bsz * heads * seq <= max_elems:
        rows += block
    return rows


@pytest.mark.parametrize(
    "max_elems,bsz,heads,seq,block",
    [
        (1 << 20, 2, 3, 100, 16),
        (2000, 1, 2, 60, 16),
        (1, 1, 1, 64, 32),
        (6400, 1, 1, 100, 16),
        (6399, 1, 1, 100, 16),
        (0, 1, 1, 1, 8),
    ],
)
def test_chunk_rows_is_the_most_whole_blocks_within_the_budget(max_elems, bsz, heads, seq, block):
    rows = chunk_rows(max_elems, bsz, heads, seq, block)
    assert rows == chunk_rows_oracle(max_elems, bsz, heads, seq, block)
    assert rows % block == 0 and rows >= block


def test_chunk_rows_examples():
    assert chunk_rows(6400, 1, 1, 100, 16) == 64  # exactly 4 blocks of 16 rows x 100 columns
    assert chunk_rows(6399, 1, 1, 100, 16) == 48  # one number short: a block fewer
    assert chunk_rows(10, 4, 4, 100, 32) == 32  # budget below one block: still one block


def test_gather_tokens_takes_each_heads_rows_in_its_order():
    b, h, n, d = 2, 3, 11, 4
    x = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(0))
    perm = random_perms(h, n, seed=1)
    out = gather_tokens(x, perm)
    expect = torch.empty_like(x)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                expect[bi, hi, i] = x[bi, hi, perm[hi, i]]
    assert torch.equal(out, expect)


def test_gather_tokens_example():
    x = torch.arange(12.0).reshape(1, 2, 6, 1)
    perm = torch.tensor([[5, 0, 4, 1, 3, 2], [0, 1, 2, 3, 4, 5]])
    assert gather_tokens(x, perm)[0, :, :, 0].tolist() == [[5, 0, 4, 1, 3, 2], [6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("text_len,text_first", LAYOUTS)
@pytest.mark.parametrize("permuted", [False, True], ids=["arrival", "permuted"])
def test_to_paro_order_splits_transposes_and_permutes(text_len, text_first, permuted):
    b, s, h, d = 2, 13, 3, 2
    n = s - text_len
    x = token_ids(b, s, h, d)
    perm = random_perms(h, n, seed=text_len) if permuted else None
    text, visual = to_paro_order(x, SequenceLayout(text_len, text_first), perm)
    assert text.shape == (b, h, text_len, d) and visual.shape == (b, h, n, d)
    first_visual = text_len if text_first else 0
    first_text = 0 if text_first else n
    for bi in range(b):
        for hi in range(h):
            for t in range(text_len):
                assert torch.equal(text[bi, hi, t], x[bi, first_text + t, hi])
            for i in range(n):
                token = perm[hi, i].item() if permuted else i
                assert torch.equal(visual[bi, hi, i], x[bi, first_visual + token, hi])


def block_mask_oracle(kept, block, n, first_block, rows):
    heads = kept.shape[0]
    mask = torch.empty(heads, rows, n, dtype=torch.bool)
    for h in range(heads):
        for r in range(rows):
            for c in range(n):
                mask[h, r, c] = kept[h, (first_block * block + r) // block, c // block]
    return mask


@pytest.mark.parametrize("first_block,rows", [(0, 37), (1, 16), (1, 21), (2, 5)])
def test_block_mask_rows_expands_blocks_to_elements(first_block, rows):
    n, block = 37, 16  # three blocks, the last of 5 tokens
    nb = num_blocks(n, block)
    kept = torch.rand(2, nb, nb, generator=torch.Generator().manual_seed(first_block)) < 0.5
    mask = block_mask_rows(kept, block, n, first_block, rows)
    assert mask.dtype == torch.bool and mask.shape == (2, rows, n)
    assert torch.equal(mask, block_mask_oracle(kept, block, n, first_block, rows))


def test_block_mask_rows_example():
    kept = torch.tensor([[[True, False], [False, True]]])  # one head, block-diagonal
    mask = block_mask_rows(kept, 2, 3, 0, 3)
    assert mask[0].int().tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert block_mask_rows(kept, 2, 3, 1, 1)[0].int().tolist() == [[0, 0, 1]]


def kept_lists_oracle(row):
    return [c for c, k in enumerate(row.tolist()) if k]


def test_kept_block_lists_puts_kept_tiles_first_ascending():
    g = torch.Generator().manual_seed(0)
    kept = torch.rand(2, 3, 6, 6, generator=g) < 0.4  # leading dims: (slot, head)
    kept[0, 0, 1] = False  # a query tile that keeps nothing
    kept[1, 2, 4] = True  # one that keeps everything
    index, count = kept_block_lists(kept)
    assert index.dtype == torch.int32 and count.dtype == torch.int32
    assert index.shape == kept.shape and count.shape == kept.shape[:-1]
    for row, listed, c in zip(kept.reshape(-1, 6), index.reshape(-1, 6), count.flatten().tolist(), strict=True):
        expect = kept_lists_oracle(row)
        assert c == len(expect)
        assert listed[:c].tolist() == expect
        assert sorted(listed.tolist()) == list(range(6))  # the rest: the dropped tiles, each once
    assert count[0, 0, 1] == 0 and count[1, 2, 4] == 6


def test_kept_block_lists_example():
    kept = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, True]])
    index, count = kept_block_lists(kept)
    assert count.tolist() == [2, 0, 4]
    assert index[0, :2].tolist() == [1, 3]
    assert index[2].tolist() == [0, 1, 2, 3]
