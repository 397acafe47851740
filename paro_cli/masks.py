"""Block masks as data: bool tensors (..., nb, nb) over (query block, key block), True where a
tile is computed, and the rules that make them. Calibration selects blocks by attention mass
(`select_blocks`), the local-window baseline by distance (`local_window_mask`), the benchmarks'
synthetic plans at random (`random_kept`); every mask keeps `forced_blocks`.
"""

from __future__ import annotations

import torch

from paro_kernels.layout import num_blocks


def forced_blocks(nb: int, n: int, block: int, device=None) -> torch.Tensor:
    """Blocks every mask keeps: the diagonal and, if the last block is ragged, its column."""
    forced = torch.eye(nb, dtype=torch.bool, device=device)
    if n % block:
        forced[:, -1] = True
    return forced


def select_blocks(mass: torch.Tensor, density: float, n: int, block: int) -> torch.Tensor:
    """Kept blocks (H, nb, nb) at `density`, one threshold shared by the H heads given (one
    layer's, or every planned layer's heads stacked for a global allocation).

    `mass` is normalised per row block. Keeping every block with mass >= theta, with theta set so
    that round(density * H * nb * nb) blocks are kept, is a top-k over the unforced blocks: the
    exact solution a bisection on theta approaches. A sharp head thus keeps few blocks and a
    diffuse head many, for the same total work.
    """
    heads, nb, _ = mass.shape
    forced = forced_blocks(nb, n, block, mass.device).expand(heads, nb, nb)
    kept = forced.clone()
    extra = round(density * kept.numel()) - int(forced.sum())
    if extra > 0:
        scores = mass.masked_fill(forced, float("-inf")).flatten()
        kept.view(-1)[scores.topk(extra).indices] = True
    return kept


def local_window_mask(grid: tuple[int, int, int], block: int, density: float) -> torch.Tensor:
    """(nb, nb) bool: per query block the round(density * nb) key blocks whose centres (mean
    token coordinates) are nearest to its own, plus the blocks every mask keeps."""
    n = grid[0] * grid[1] * grid[2]
    nb = num_blocks(n, block)
    coords = torch.stack(
        torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij"), -1
    ).reshape(n, 3)
    pad = nb * block - n
    weights = torch.nn.functional.pad(torch.ones(n, dtype=torch.float64), (0, pad)).view(nb, block, 1)
    padded = torch.nn.functional.pad(coords, (0, 0, 0, pad)).view(nb, block, 3)
    centres = (padded * weights).sum(1) / weights.sum(1)
    distance = torch.cdist(centres, centres)
    keep = max(1, round(density * nb))
    kept = forced_blocks(nb, n, block)
    kept.scatter_(1, distance.topk(keep, dim=1, largest=False).indices, True)
    return kept


def random_kept(heads: int, nb: int, density: float | torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Block masks with round(density * nb) kept tiles in every row, the diagonal among them:
    the work a calibrated mask of that density gives, evenly spread over query tiles. `density`
    is one for all heads or one per head."""
    g = torch.Generator().manual_seed(seed)
    keep = (torch.as_tensor(density, dtype=torch.float64).expand(heads) * nb).round().clamp(1, nb).long()
    scores = torch.rand(heads, nb, nb, generator=g)
    scores[:, torch.arange(nb), torch.arange(nb)] = 2.0
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # each tile's rank in its row
    return rank < keep[:, None, None]


def uneven_densities(shape: tuple[int, ...], density: float, nb: int, seed: int = 0) -> torch.Tensor:
    """Per-head densities as a global allocation spreads them (log-normal around `density`, each
    in [1/nb, 1]), averaging `density` (to rounding and the clip at 1): the benchmarks' stand-in
    for a calibrated global plan, whose kernels do the same total work as a per-layer plan's."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.exp(0.75 * torch.randn(shape, generator=g, dtype=torch.float64))
    return (density * weights / weights.mean()).clamp(1 / nb, 1.0)
