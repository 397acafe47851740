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

from paro_kernels.orders import candidate_orders

from .masks import local_window_mask
from .plan import Plan, pack_bits


def local_window_plan(plan: Plan) -> Plan:
    """`plan` with every head in arrival order and the static local window at its density."""
    arrival = candidate_orders(plan.grid)[0]
    mask = local_window_mask(plan.grid, plan.block_size, plan.density)
    components = {}
    for name, comp in plan.components.items():
        shape = (plan.num_slots, comp.num_layers, comp.num_heads)
        density = torch.full(shape, mask.float().mean().item())
        components[name] = dataclasses.replace(
            comp,
            orders=[[arrival] * comp.num_heads for _ in range(comp.num_layers)],
            packed_masks=pack_bits(mask.expand(*shape, *mask.shape)).contiguous(),
            achieved_density=density,
            target_density=torch.full(shape, plan.density),
            slots_run=None,  # the window in every slot, for each expert
        )
    return dataclasses.replace(plan, components=components, extra={**plan.extra, "baseline": "static local window"})
