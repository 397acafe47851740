"""Calibration statistics against a float64 computation over the full attention map."""

import math

import pytest
import torch

from paro_kernels.layout import SequenceLayout
from paro_kernels.stats import block_statistics, mass_recall

from conftest import position_in_order, rel_l2, structured_qkv


def full_map_statistics(q, k, orders, grid, block, layout):
    """Mass (each sample's share of its row block, the largest over the batch) and incoherence
    from the whole softmax, block membership from the stride formula."""
    b, s, heads, d = q.shape
    n = math.prod(grid)
    probs = torch.softmax(torch.einsum("bshd,bthd->bhst", q.double(), k.double()) / math.sqrt(d), dim=-1)
    vis = slice(layout.text_len, layout.text_len + n) if layout.text_first else slice(0, n)
    probs = probs[:, :, vis, vis]
    nb = math.ceil(n / block)
    mass = torch.zeros(b, heads, nb, nb, dtype=torch.float64)
    ratios = torch.zeros(heads, dtype=torch.float64)
    for h, order in enumerate(orders):
        blk = torch.tensor(
            [
                position_in_order(order, grid, f, y, x) // block
                for f in range(grid[0])
                for y in range(grid[1])
                for x in range(grid[2])
            ]
        )
        for i in range(nb):
            for j in range(nb):
                tile = probs[:, h][:, blk == i][:, :, blk == j]  # (B, rows, cols)
                mass[:, h, i, j] = tile.sum(dim=(1, 2))
                mean = tile.mean(dim=(1, 2))
                ratios[h] += (tile.amax(dim=(1, 2)) / mean).mean() / nb**2
    return (mass / mass.sum(dim=-1, keepdim=True)).amax(dim=0), ratios


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("text_len,text_first", [(0, True), (6, False), (9, True)])
def test_streamed_statistics_match_full_map(text_len, text_first, use_triton):
    if use_triton and torch.cuda.is_available():
        pytest.skip("CPU tensors need the interpreter; the GPU statistics kernel is tested in test_triton_kernels")
    grid, block, orders = (3, 4, 6), 16, ["WHF", "FWH", "HFW"]
    q, k, v = structured_qkv(2, 72 + text_len, 3, 16, seed=7)
    layout = SequenceLayout(text_len, text_first)
    stats = block_statistics(
        q,
        k,
        v,
        orders=[orders, orders[::-1]],
        grid=grid,
        block=block,
        layout=layout,
        piece_elems=3000,
        use_triton=use_triton,
    )
    for o, candidate in enumerate((orders, orders[::-1])):
        mass, incoherence = full_map_statistics(q, k, candidate, grid, block, layout)
        torch.testing.assert_close(stats.mass[o].double(), mass, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.incoherence[o].double(), incoherence, rtol=1e-4, atol=1e-5)
    if use_triton:
        assert stats.output is None  # the GPU path leaves the output to the stock call
    else:  # the same pieces of P give the attention output, every row of it (text rows too)
        probs = torch.softmax(torch.einsum("bshd,bthd->bhst", q.double(), k.double()) / 4.0, dim=-1)
        expected = torch.einsum("bhst,bthd->bshd", probs, v.double())
        assert stats.output.shape == v.shape and rel_l2(stats.output, expected) <= 1e-6


def test_mass_recall():
    mass = torch.tensor([[[4.0, 0.0], [1.0, 5.0]]])  # top 2 of 4 blocks hold 9 of 10
    assert mass_recall(mass, 0.5).item() == pytest.approx(0.9)
    assert mass_recall(mass, 1.0).item() == pytest.approx(1.0)
    assert mass_recall(mass, 0.25).item() == pytest.approx(0.5)
