"""Calibration's passes, as attention handlers (intercept.py) on dense sampling runs:
OrderProfiler scores the candidate orders of every head, MassCollector turns each timestep
slot's block mass into masks.

Where every candidate order's mass of every slot fits in memory (`one_run_fits`), one sampling
run does both: the MassCollector collects the mass of every allowed order and hands the
profiled steps' statistics to the OrderProfiler, and the masks are selected in the chosen orders
after the run. Otherwise the profiler runs first, alone, and the collector then needs only each
head's chosen order, selecting a slot's masks as soon as the slot ends.
"""

from __future__ import annotations

import torch

from paro_kernels.layout import SequenceLayout, num_blocks
from paro_kernels.stats import BlockStatistics, block_statistics, mass_recall, row_shares

from ..intercept import DenseFn
from ..masks import select_blocks
from ..plan import pack_bits
from ..steps import StepTracker

# Memory the mass of every candidate order of every slot may take for calibration to be one run.
ONE_RUN_BYTES = 1 << 30


def local_is_whole(local: torch.Tensor, dim: int) -> torch.Tensor:
    """One process holds every head: its statistics need no gathering."""
    return local


def attention_output(stats: BlockStatistics, dense: DenseFn) -> torch.Tensor:
    """The call's output: the one the statistics computed from their P (on the CPU), else the
    stock call's."""
    return stats.output if stats.output is not None else dense()


def one_run_fits(slots: int, layers: int, orders: int, heads: int, grid, block: int) -> bool:
    """Whether the block mass (float32) of `orders` candidate orders of every slot fits ONE_RUN_BYTES."""
    nb = num_blocks(grid[0] * grid[1] * grid[2], block)
    return slots * layers * orders * heads * nb * nb * 4 <= ONE_RUN_BYTES


class OrderProfiler:
    """Recall and incoherence of each of `orders` (the candidates the recipe allows), every head,
    at the profiled steps.

    A handler of its own (the profiling run), or fed by a MassCollector's statistics (`add`) when
    one run does both. `heads` is how many heads its calls hold (under context parallelism, this
    rank's: see parallel.py); `gather(local, dim)` joins every rank's along the head dim `dim`."""

    def __init__(
        self,
        layers: int,
        heads: int,
        block: int,
        density: float,
        steps: set[int],
        orders: list[str],
        gather=local_is_whole,
    ):
        self.block, self.density, self.steps, self.orders, self.gather = block, density, steps, orders, gather
        self.tracker = StepTracker()
        self.profile = False
        self.recall: torch.Tensor | None = None
        self.incoherence: torch.Tensor | None = None
        self.count = torch.zeros(layers)
        self.shape = (layers, heads)

    def candidates(self) -> list[list[str]]:
        """The orders it profiles, each for every one of this rank's heads."""
        return [[order] * self.shape[1] for order in self.orders]

    def on_forward(self, grid, layout, t):
        step = self.tracker.see(grid, layout, t)
        self.profile = step in self.steps
        if self.recall is None:
            shape = (*self.shape, len(self.orders))
            self.recall, self.incoherence = torch.zeros(shape), torch.zeros(shape)

    def attention(self, layer: int, q, k, v, dense: DenseFn, layout):
        if not self.profile:
            return dense()
        stats = block_statistics(
            q, k, v, orders=self.candidates(), grid=self.tracker.grid, block=self.block, layout=layout
        )
        self.add(layer, stats)
        return attention_output(stats, dense)

    def add(self, layer: int, stats: BlockStatistics) -> None:
        """One profiled call's statistics of every candidate order (in `candidates` order)."""
        self.recall[layer] += mass_recall(stats.mass, self.density).T.cpu()
        self.incoherence[layer] += stats.incoherence.T.cpu()
        self.count[layer] += 1

    def step_done(self) -> None:
        self.tracker.step_done()

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean recall and incoherence (layers, heads, candidates) of every head."""
        n = self.count.clamp_min(1)[:, None, None]
        return self.gather(self.recall / n, 1), self.gather(self.incoherence / n, 1)


class MassCollector:
    """Each head's block mass in its candidate orders (its largest share over a call's samples,
    stats.summarise), normalised per row block and averaged within each timestep slot, reduced
    to masks.

    candidates[layer] lists orders, one name per head this rank's calls hold (under context
    parallelism, its share of the model's `heads`). With one candidate (each head's chosen
    order) a slot's masks are selected as soon as the slot ends, so memory holds one slot. With
    several (every order, `profiler` then fed the profiled steps' statistics from the same calls)
    every slot waits for `finish(choice)`.
    A finished slot's mass is gathered over all heads (`gather`, as OrderProfiler's) before a
    layer's blocks are chosen, since one threshold serves all of a layer's heads."""

    def __init__(
        self,
        candidates: list[list[list[str]]],
        grid,
        slots: list[int],
        block: int,
        density: float,
        dense_layers: set[int],
        device: torch.device,
        heads: int,
        gather=local_is_whole,
        profiler: OrderProfiler | None = None,
        layout: SequenceLayout | None = None,
        allocation: str = "layer",
    ):
        self.grid, self.slots, self.gather, self.profiler = tuple(grid), slots, gather, profiler
        self.allocation = allocation
        self.candidates, self.block, self.density, self.dense_layers = candidates, block, density, dense_layers
        self.device = device
        self.tracker = StepTracker(self.grid, layout)  # a profiling run's input, its steps counted the same way
        self.n = self.grid[0] * self.grid[1] * self.grid[2]
        self.nb = num_blocks(self.n, block)
        layers, num_slots = len(candidates), max(slots) + 1
        # Each finished slot is kept bit-packed (pack_bits), with its kept share: at Wan-14B's
        # 720p size (40 x 40 heads, 591 blocks), the 21 slots of a 40-step schedule would take
        # 11.7 GB of host memory as bools, 1.5 GB packed (arithmetic, not a measurement).
        dense = pack_bits(torch.ones(heads, self.nb, self.nb, dtype=torch.bool))
        self.packed = dense.expand(num_slots, layers, -1, -1).clone()
        self.achieved = torch.ones(num_slots, layers, heads)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (mass sums, calls per layer)
        self.slot: int | None = None

    def step_done(self) -> None:
        self.tracker.step_done()
        if self.profiler is not None:
            self.profiler.step_done()

    def on_forward(self, grid, layout, t):
        if self.profiler is not None:
            self.profiler.on_forward(grid, layout, t)
        slot = self.slots[min(self.tracker.see(grid, layout, t), len(self.slots) - 1)]
        if self.slot is not None and slot != self.slot and self._one_candidate():
            self._select(self.slot, None)
        self.slot = slot

    def attention(self, layer: int, q, k, v, dense: DenseFn, layout):
        profile = self.profiler is not None and self.profiler.profile
        stats = block_statistics(
            q, k, v, orders=self.candidates[layer], grid=self.grid, block=self.block, layout=layout, peaks=profile
        )
        if profile:
            self.profiler.add(layer, stats)
        if self.slot not in self.pending:
            shape = (len(self.candidates), len(self.candidates[0]), q.shape[2], self.nb, self.nb)
            self.pending[self.slot] = torch.zeros(shape, device=self.device), torch.zeros(len(self.candidates))
        sums, count = self.pending[self.slot]
        mass = stats.mass
        sums[layer] += row_shares(mass)  # the batch's largest shares no longer sum to 1 per row
        count[layer] += 1
        return attention_output(stats, dense)

    def finish(self, choice: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed masks (slots, layers, heads, nbytes), kept share (slots, layers, heads)) after
        the run; `choice` (layers, all heads) picks each head's candidate when there are several.
        Slots the transformer never ran (another expert's steps) stay dense."""
        for slot in sorted(self.pending):
            self._select(slot, choice)
        self.slot = None
        return self.packed, self.achieved

    def _one_candidate(self) -> bool:
        return all(len(c) == 1 for c in self.candidates)

    def _select(self, slot: int, choice: torch.Tensor | None) -> None:
        """A finished slot's masks from each head's mass in its chosen order: one threshold per
        layer ("layer" allocation) or one over every planned layer ("global": the same number of
        kept blocks in all, more where the mass is spread, fewer where it is concentrated)."""
        sums, count = self.pending.pop(slot)
        planned = [layer for layer in range(sums.shape[0]) if layer not in self.dense_layers and count[layer] > 0]
        mass = {}
        for layer in planned:
            candidates = self.gather(sums[layer] / count[layer], 1)  # (candidates, all heads, nb, nb)
            heads = torch.arange(candidates.shape[1], device=candidates.device)
            index = torch.zeros_like(heads) if choice is None else choice[layer].to(heads.device)
            mass[layer] = candidates[index, heads]
        groups = [[layer] for layer in planned] if self.allocation == "layer" else [planned] if planned else []
        for group in groups:
            kept = select_blocks(torch.cat([mass[layer] for layer in group]), self.density, self.n, self.block)
            for layer, layer_kept in zip(group, kept.split([len(mass[layer]) for layer in group])):
                # packed where the mass is (a GPU): a copy of an eighth the size, no CPU pass
                self.packed[slot, layer] = pack_bits(layer_kept).cpu()
                self.achieved[slot, layer] = layer_kept.float().mean(dim=(-1, -2)).cpu()
