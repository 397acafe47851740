"""Block masks (paro_cli/masks.py): the blocks every mask keeps, calibration's mass threshold,
the local-window baseline and the benchmarks' random masks."""

import torch

from paro_cli.masks import forced_blocks, local_window_mask, random_kept, select_blocks, uneven_densities


def test_select_blocks_shares_one_threshold_across_heads():
    g = torch.Generator().manual_seed(0)
    sharp = torch.eye(8) * 0.9 + torch.rand(8, 8, generator=g) * 0.01
    diffuse = torch.rand(8, 8, generator=g)
    mass = torch.stack([sharp, diffuse])
    mass = mass / mass.sum(-1, keepdim=True)
    kept = select_blocks(mass, 0.4, n=100, block=13)  # 100 tokens in blocks of 13: ragged last block
    forced = forced_blocks(8, 100, 13)
    assert forced[:, -1].all() and kept[:, :, -1].all() and kept[:, torch.arange(8), torch.arange(8)].all()
    assert int(kept.sum()) == round(0.4 * 2 * 64)
    assert kept[0].sum() < kept[1].sum()  # the sharp head needs fewer blocks
    free = ~forced.expand(2, 8, 8)
    assert mass[kept & free].min() >= mass[~kept].max()  # one theta: all kept >= all dropped


def test_density_one_keeps_everything():
    assert select_blocks(torch.rand(2, 5, 5), 1.0, n=80, block=16).all()


def test_local_window_keeps_the_nearest_blocks():
    # one frame of one row: blocks are segments of a line, the window is a band
    mask = local_window_mask((1, 1, 64), 8, 3 / 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(8):
        near = sorted(range(8), key=lambda j: (abs(i - j), j))[:3]
        expected[i, near] = True
    assert torch.equal(mask, expected)
    video = local_window_mask((8, 16, 16), 64, 0.3)
    assert video.diagonal().all() and (video.sum(1) == round(0.3 * 32)).all()


def test_random_kept_keeps_the_same_count_per_row_with_the_diagonal():
    kept = random_kept(3, 10, 0.3, seed=4)
    assert kept.shape == (3, 10, 10) and (kept.sum(-1) == 3).all() and kept.diagonal(dim1=-2, dim2=-1).all()
    assert torch.equal(kept, random_kept(3, 10, 0.3, seed=4)) and not torch.equal(kept, random_kept(3, 10, 0.3, seed=5))
    assert (random_kept(1, 4, 0.01).sum(-1) == 1).all()  # at least the diagonal


def test_random_kept_takes_a_density_per_head_and_uneven_densities_keep_the_mean():
    kept = random_kept(3, 20, torch.tensor([0.1, 0.5, 1.0]), seed=1)
    assert kept.sum(-1).tolist() == [[2] * 20, [10] * 20, [20] * 20]
    assert kept[:, torch.arange(20), torch.arange(20)].all()
    shares = uneven_densities((30, 12), 0.2, 256)
    assert shares.std() > 0.05 and (shares >= 1 / 256).all() and (shares <= 1).all()
    assert abs(shares.mean().item() - 0.2) < 0.01  # the global plan's work is the per-layer plan's
