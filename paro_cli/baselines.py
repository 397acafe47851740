"""The sparse-attention baselines paro is compared with at equal density (`paro bench quality`).

- No reordering: calibration as usual, but every head keeps the arrival order (a recipe with
  `calibration.orders: [FHW]`), so only the block selection is paro's.
- Static local window (sliding-tile style): no calibration at all. In arrival order, each query
  block keeps the key blocks whose tokens lie nearest to its own in the (frame, height, width)
  grid, the same number for every row, head, layer and step.
"""

from __future__ import annotations

import dataclasses

import torch

from paro_kernels.layout import num_blocks
from paro_kernels.orders import candidate_orders

from .calibration import forced_blocks
from .plan import Plan, pack_bits


def local_window_mask(grid: tuple[int, int, int], block: int, density: float) -> torch.Tensor:
    """(nb, nb) bool: per query block the round(density * nb) key blocks whose centres (mean
    token coordinates) are nearest to its own, plus the blocks every mask keeps."""
    n = grid[0] * grid[1] * grid[2]
    nb = num_blocks(n, block)
    coords = torch.stack(torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij"), -1).reshape(n, 3)
    pad = nb * block - n
    weights = torch.nn.functional.pad(torch.ones(n, dtype=torch.float64), (0, pad)).view(nb, block, 1)
    padded = torch.nn.functional.pad(coords, (0, 0, 0, pad)).view(nb, block, 3)
    centres = (padded * weights).sum(1) / weights.sum(1)
    distance = torch.cdist(centres, centres)
    keep = max(1, round(density * nb))
    kept = forced_blocks(nb, n, block)
    kept.scatter_(1, distance.topk(keep, dim=1, largest=False).indices, True)
    return kept


def local_window_plan(plan: Plan) -> Plan:
    """`plan` with every head in arrival order and the static local window at its density."""
    arrival = candidate_orders(plan.grid)[0]
    mask = local_window_mask(plan.grid, plan.block_size, plan.density)
    components = {}
    for name, comp in plan.components.items():
        shape = (plan.num_slots, comp.num_layers, comp.num_heads)
        density = torch.full(shape, mask.float().mean().item())
        components[name] = dataclasses.replace(
            comp, orders=[[arrival] * comp.num_heads for _ in range(comp.num_layers)],
            packed_masks=pack_bits(mask.expand(*shape, *mask.shape)).contiguous(), achieved_density=density,
            target_density=torch.full(shape, plan.density), slots_run=None,  # the window in every slot, for each expert
        )
    return dataclasses.replace(plan, components=components, extra={**plan.extra, "baseline": "static local window"})
