"""Token orders: permutations of the axes of a visual token grid.

Visual tokens arrive frame-major, index = f*H*W + h*W + w. An order is named by its axis letters
from outermost to innermost ("FHW" is the arrival order, "HWF" puts time innermost). Reordering a
head's tokens so that the axis it attends along is innermost makes its attention block-wise.

Orders are data: the candidates come from `itertools.permutations`, a permutation is computed
from the grid, and its inverse by `argsort`; nothing is typed out twice.
"""

from __future__ import annotations

import itertools

import torch

VIDEO_AXES = "FHW"
IMAGE_AXES = "HW"


def axes_of(grid: tuple[int, int, int]) -> str:
    """The axes a grid is ordered over: (H, W) for a single frame, (F, H, W) otherwise."""
    return IMAGE_AXES if grid[0] == 1 else VIDEO_AXES


def candidate_orders(grid: tuple[int, int, int]) -> list[str]:
    """All orders of a grid's axes; the arrival order comes first."""
    return ["".join(p) for p in itertools.permutations(axes_of(grid))]


def check_order(order: str, grid: tuple[int, int, int]) -> None:
    if sorted(order) != sorted(axes_of(grid)):
        raise ValueError(f"order {order!r} is not an order of axes {axes_of(grid)!r} (grid {grid})")


def order_permutation(order: str, grid: tuple[int, int, int]) -> torch.Tensor:
    """perm[i] = arrival index of the token at position i of `order` (int64, length F*H*W)."""
    check_order(order, grid)
    index = torch.arange(grid[0] * grid[1] * grid[2]).reshape(grid)
    if len(order) == 2:
        index = index[0]
        dims = [IMAGE_AXES.index(a) for a in order]
    else:
        dims = [VIDEO_AXES.index(a) for a in order]
    return index.permute(*dims).reshape(-1)


def head_permutations(orders: list[str], grid: tuple[int, int, int]) -> torch.Tensor:
    """Stacked permutations, one row per head: (H, N) int64."""
    cache = {o: order_permutation(o, grid) for o in set(orders)}
    return torch.stack([cache[o] for o in orders])


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv such that x[perm][inv] == x; works row-wise on (..., N)."""
    return torch.argsort(perm, dim=-1)
