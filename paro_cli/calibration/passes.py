"""Calibration's two passes, as attention handlers (intercept.py) on dense sampling runs:
OrderProfiler scores every candidate order of every head, MassCollector turns each timestep
slot's block mass in the chosen orders into masks."""

from __future__ import annotations

import torch

from paro_kernels.layout import SequenceLayout, num_blocks
from paro_kernels.orders import candidate_orders, head_permutations, order_permutation
from paro_kernels.stats import block_statistics, mass_recall

from ..intercept import DenseFn
from ..masks import select_blocks
from ..plan import pack_bits
from ..steps import StepTracker


def local_is_whole(local: torch.Tensor, dim: int) -> torch.Tensor:
    """One process holds every head: its statistics need no gathering."""
    return local


class OrderProfiler:
    """Pass 1 handler: recall and incoherence of every candidate order, every head.

    `heads` is how many heads its calls hold (under context parallelism, this rank's: see
    parallel.py); `gather(local, dim)` joins every rank's along the head dim `dim`."""

    def __init__(self, layers: int, heads: int, block: int, density: float, steps: set[int], gather=local_is_whole):
        self.block, self.density, self.steps, self.gather = block, density, steps, gather
        self.tracker = StepTracker()
        self.profile = False
        self.recall: torch.Tensor | None = None
        self.incoherence: torch.Tensor | None = None
        self.count = torch.zeros(layers)
        self.shape = (layers, heads)
        self.perms: torch.Tensor | None = None  # (candidates, heads, N), made at the first call

    def on_forward(self, grid, layout, t):
        step = self.tracker.see(grid, layout, t)
        self.profile = step in self.steps
        if self.recall is None:
            shape = (*self.shape, len(candidate_orders(self.tracker.grid)))
            self.recall, self.incoherence = torch.zeros(shape), torch.zeros(shape)

    def attention(self, layer: int, q, k, v, dense: DenseFn, layout):
        if self.profile:
            if self.perms is None:
                grid, heads = self.tracker.grid, q.shape[2]
                self.perms = torch.stack(
                    [order_permutation(o, grid).expand(heads, -1) for o in candidate_orders(grid)]
                ).to(q.device)
            stats = block_statistics(q, k, perms=self.perms, block=self.block, layout=layout)
            self.recall[layer] += mass_recall(stats.mass, self.density).T.cpu()
            self.incoherence[layer] += stats.incoherence.T.cpu()
            self.count[layer] += 1
        return dense()

    def step_done(self) -> None:
        self.tracker.step_done()

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean recall and incoherence (layers, heads, candidates) of every head."""
        n = self.count.clamp_min(1)[:, None, None]
        return self.gather(self.recall / n, 1), self.gather(self.incoherence / n, 1)


class MassCollector:
    """Pass 2 handler: block mass in the chosen orders, reduced to masks slot by slot.

    Its calls hold the heads `heads` (this rank's, under context parallelism); a finished slot's
    mass is gathered over all heads (`gather`, as OrderProfiler's) before a layer's blocks are
    chosen, since one threshold serves all of a layer's heads."""

    def __init__(
        self,
        orders: list[list[str]],
        grid,
        slots: list[int],
        block: int,
        density: float,
        dense_layers: set[int],
        layout: SequenceLayout,
        device: torch.device,
        heads: slice | None = None,
        gather=local_is_whole,
    ):
        self.grid, self.slots, self.gather = tuple(grid), slots, gather
        local = heads or slice(0, len(orders[0]))
        self.block, self.density, self.dense_layers = block, density, dense_layers
        self.tracker = StepTracker(self.grid, layout)  # pass 1's input, its steps counted the same way
        self.perms = torch.stack([head_permutations(o[local], self.grid) for o in orders]).to(device)
        self.n = self.grid[0] * self.grid[1] * self.grid[2]
        nb = num_blocks(self.n, block)
        layers, heads, num_slots = len(orders), len(orders[0]), max(slots) + 1
        # Each finished slot is kept bit-packed (pack_bits), with its kept share: at Wan-14B's
        # 720p size (40 x 40 heads, 591 blocks), the 21 slots of a 40-step schedule would take
        # 11.7 GB of host memory as bools, 1.5 GB packed (arithmetic, not a measurement).
        dense = pack_bits(torch.ones(heads, nb, nb, dtype=torch.bool))
        self.packed = dense.expand(num_slots, layers, -1, -1).clone()
        self.achieved = torch.ones(num_slots, layers, heads)
        self.nb = nb
        self.sum = torch.zeros(layers, len(orders[0][local]), nb, nb, device=device)
        self.count = torch.zeros(layers)
        self.slot: int | None = None

    def step_done(self) -> None:
        self.tracker.step_done()

    def on_forward(self, grid, layout, t):
        slot = self.slots[min(self.tracker.see(grid, layout, t), len(self.slots) - 1)]
        if self.slot is not None and slot != self.slot:
            self.finish_slot()
        self.slot = slot

    def attention(self, layer: int, q, k, v, dense: DenseFn, layout):
        mass = block_statistics(q, k, perms=self.perms[layer][None], block=self.block, layout=layout).mass[0]
        self.sum[layer] += mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        self.count[layer] += 1
        return dense()

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed masks (slots, layers, heads, nbytes), kept share (slots, layers, heads)) after
        the pass; slots the transformer never ran (another expert's steps) stay dense."""
        if self.slot is not None:
            self.finish_slot()
        return self.packed, self.achieved

    def finish_slot(self) -> None:
        for layer in range(self.sum.shape[0]):
            if layer not in self.dense_layers and self.count[layer] > 0:
                kept = select_blocks(
                    self.gather(self.sum[layer] / self.count[layer], 0), self.density, self.n, self.block
                )
                # packed where the mass is (a GPU): a copy of an eighth the size, no CPU pass
                self.packed[self.slot, layer] = pack_bits(kept).cpu()
                self.achieved[self.slot, layer] = kept.float().mean(dim=(-1, -2)).cpu()
        self.slot = None
        self.sum.zero_()
        self.count.zero_()
