"""Calibration: attention statistics -> one order per (layer, head) -> block masks per slot.

Two sampling passes over the same prompts and seeds, both with dense (stock) attention, so they
follow the same trajectory:
  1. OrderProfiler: at the profiled steps, for every candidate order, each head's mass recall at
     the target density and its block incoherence (kernels/paro_kernels/stats.py), averaged over prompts,
     CFG branches and steps. `choose_orders` applies the corrected score of method.md.
  2. MassCollector: at every step, each head's block mass in its chosen order, normalised per
     row block and averaged within its timestep slot; a finished slot becomes masks at once
     (masks.select_blocks), so memory holds one slot's statistics, never an N x N map.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from paro_kernels.layout import SequenceLayout, num_blocks
from paro_kernels.orders import candidate_orders, head_permutations, order_permutation
from paro_kernels.stats import block_statistics, mass_recall

from . import runner
from .errors import ParoError, RecipeError
from .intercept import DenseFn, intercept_components
from .masks import select_blocks
from .models.loaded import LoadedModel
from .parallel import gather_heads, local_heads
from .plan import ComponentPlan, Plan, pack_bits, text_position
from .recipe import Recipe

RECALL_TOLERANCE = 0.005  # orders this close to the best recall are tied; incoherence decides


def slot_of_steps(num_steps: int, policy: str) -> list[int]:
    """"half": the first half of the steps get a slot each, the rest share one; "single": one."""
    if policy == "single":
        return [0] * num_steps
    half = num_steps // 2
    return [min(i, half) for i in range(num_steps)]


def slot_bounds(timesteps: list[float], slots: list[int]) -> list[float]:
    """Normalised timesteps between consecutive slots (descending): slot(t) = #bounds >= t."""
    return [(timesteps[i] + timesteps[i + 1]) / 2 for i in range(len(slots) - 1) if slots[i + 1] != slots[i]]


def dense_above(timesteps: list[float], dense_first_steps: int) -> float | None:
    """Normalised timestep above which attention stays dense (the first N calibrated steps).

    None: no dense steps; -1: every step is dense.
    """
    if dense_first_steps == 0:
        return None
    if dense_first_steps >= len(timesteps):
        return -1.0
    return (timesteps[dense_first_steps - 1] + timesteps[dense_first_steps]) / 2


def profiled_steps(num_steps: int, order_steps: int | None) -> set[int]:
    if order_steps is None or order_steps >= num_steps:
        return set(range(num_steps))
    return {round(i * (num_steps - 1) / max(1, order_steps - 1)) for i in range(order_steps)}


def choose_orders(recall: torch.Tensor, incoherence: torch.Tensor, density: float, quantised: bool) -> torch.Tensor:
    """Index of the chosen candidate per (layer, head) from (layers, heads, candidates) scores.

    Highest recall wins; among candidates within RECALL_TOLERANCE of it, the lowest incoherence.
    At density 1 recall says nothing: with quantisation incoherence alone decides, without it
    the arrival order (candidate 0) is kept.
    """
    if density >= 1.0:
        if not quantised:
            return torch.zeros(recall.shape[:2], dtype=torch.long)
        return incoherence.argmin(dim=-1)
    tied = recall >= recall.amax(dim=-1, keepdim=True) - RECALL_TOLERANCE
    return incoherence.masked_fill(~tied, float("inf")).argmin(dim=-1)


def allowed_orders(requested: tuple[str, ...] | None, names: list[str]) -> list[int]:
    """Indices into `names` (the grid's candidate orders) that calibration.orders allows."""
    if requested is None:
        return list(range(len(names)))
    unknown = [o for o in requested if o not in names]
    if unknown:
        raise RecipeError(f"calibration.orders has {unknown[0]!r}, not an order of this grid's axes", "use some of " + ", ".join(names))
    return [names.index(o) for o in dict.fromkeys(requested)]


def _same_input(expected_grid, expected_layout: SequenceLayout, grid, layout: SequenceLayout) -> None:
    if tuple(grid) != tuple(expected_grid):
        raise ParoError(f"token grid changed during calibration ({expected_grid} -> {tuple(grid)})", "calibrate one geometry at a time")
    if (layout.text_len, text_position(layout)) != (expected_layout.text_len, text_position(expected_layout)):
        raise ParoError(f"text tokens in self-attention changed during calibration ({expected_layout.text_len} -> {layout.text_len})",
                        "calibrate with one text length (the pipeline's max_sequence_length)")


class StepTracker:
    """The denoising step of each forward call, counted by the sampler's end-of-step callback
    (`step_done`), not told apart by timestep: a pipeline may pass timesteps in bf16, where two
    steps near t = 1 round to one value; and one step may run several forwards (CFG passes).
    Records the normalised timestep of each step it sees (a Wan 2.2 expert sees only its own
    steps), and the token grid and text layout of the first call (later calls must match)."""

    def __init__(self, grid: tuple[int, int, int] | None = None, layout: SequenceLayout | None = None):
        self.timesteps: dict[int, float] = {}
        self.step = 0
        self.grid, self.layout = grid, layout  # None: the first call's

    def see(self, grid: tuple[int, int, int], layout: SequenceLayout, t: float) -> int:
        if self.grid is None:
            self.grid, self.layout = tuple(grid), layout
        _same_input(self.grid, self.layout, grid, layout)
        self.timesteps.setdefault(self.step, t)  # the step's first forward
        return self.step

    def step_done(self) -> None:
        self.step += 1


def _all_heads(local: torch.Tensor, dim: int) -> torch.Tensor:
    return local


class OrderProfiler:
    """Pass 1 handler: recall and incoherence of every candidate order, every head.

    `heads` is how many heads its calls hold (under context parallelism, this rank's: see
    parallel.py); `gather(local, dim)` joins every rank's along the head dim `dim`."""

    def __init__(self, layers: int, heads: int, block: int, density: float, steps: set[int], gather=_all_heads):
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
                self.perms = torch.stack([order_permutation(o, grid).expand(heads, -1) for o in candidate_orders(grid)]).to(q.device)
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

    def __init__(self, orders: list[list[str]], grid, slots: list[int], block: int, density: float, dense_layers: set[int],
                 layout: SequenceLayout, device: torch.device, heads: slice | None = None, gather=_all_heads):
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
        # 11.7 GB of host memory as bools, 1.5 GB packed.
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
                kept = select_blocks(self.gather(self.sum[layer] / self.count[layer], 0), self.density, self.n, self.block)
                # packed where the mass is (a GPU): a copy of an eighth the size, no CPU pass
                self.packed[self.slot, layer] = pack_bits(kept).cpu()
                self.achieved[self.slot, layer] = kept.float().mean(dim=(-1, -2)).cpu()
        self.slot = None
        self.sum.zero_()
        self.count.zero_()


@dataclass
class CalibrationProgress:
    """Callbacks for a UI: start(pass_name, total_steps) then step(i) per denoising step."""

    start: Callable[[str, int], None] = lambda name, total: None
    step: Callable[[int], None] = lambda i: None


def calibrate(loaded: LoadedModel, recipe: Recipe, progress: CalibrationProgress | None = None) -> Plan:
    """Profile the model on the recipe's prompts and seeds and return its plan: one component
    per transformer (Wan 2.2's two experts each get theirs, from the steps each one runs)."""
    progress = progress or CalibrationProgress()
    sp, cal = recipe.sparsity, recipe.calibration
    prompts = [p for p in cal.prompts for _ in cal.seeds]
    seeds = [s for _ in cal.prompts for s in cal.seeds]
    adapter, components = loaded.adapter, loaded.components
    layers = {name: len(adapter.attention_layers(tr)) for name, tr in components.items()}
    fewest = min(layers.values())
    bad = [i for i in sp.dense_layers if i >= fewest]
    if bad:
        raise ParoError(f"sparsity.dense_layers has layer {bad[0]}, the model has {fewest} (0..{fewest - 1})", "fix the recipe")
    grid = runner.token_grid(loaded, recipe)
    names = candidate_orders(grid)
    allowed = allowed_orders(cal.orders, names)
    steps = recipe.sampling.steps

    def run_pass(name: str, handlers: dict) -> None:
        progress.start(name, steps)
        with intercept_components(loaded, handlers):
            runner.sample(loaded, recipe, prompts, seeds, decode=False,
                          on_step=lambda i: ([h.step_done() for h in handlers.values()], progress.step(i)))

    profiled = profiled_steps(steps, cal.order_steps)
    heads = {name: local_heads(tr, adapter.num_heads(tr)) for name, tr in components.items()}  # this rank's
    gathers = {name: functools.partial(gather_heads, tr) for name, tr in components.items()}
    profilers = {name: OrderProfiler(layers[name], len(range(adapter.num_heads(tr))[heads[name]]), sp.block_size, sp.density,
                                     profiled, gathers[name])
                 for name, tr in components.items()}
    run_pass("profiling orders", profilers)
    orders, scores = {}, {}
    for name, profiler in profilers.items():
        if not profiler.tracker.timesteps:  # an expert this schedule never runs: first allowed order, masks all dense
            shape = (layers[name], adapter.num_heads(components[name]), len(names))
            scores[name] = torch.zeros(shape), torch.zeros(shape)
            orders[name] = [[names[allowed[0]]] * shape[1] for _ in range(shape[0])]
            continue
        scores[name] = recall, incoherence = profiler.scores()
        if profiler.count.sum() == 0:
            raise ParoError(f"no profiled step ran the model's {name}", "profile more steps: raise calibration.order_steps, or null for all")
        chosen = choose_orders(recall[..., allowed], incoherence[..., allowed], sp.density, recipe.quantised)
        orders[name] = [[names[allowed[i]] for i in row] for row in chosen.tolist()]

    schedule = {step: t for profiler in profilers.values() for step, t in profiler.tracker.timesteps.items()}
    timesteps = [schedule[i] for i in sorted(schedule)]
    layout = next(p.tracker.layout for p in profilers.values() if p.tracker.layout is not None)
    slots = slot_of_steps(len(timesteps), sp.slots)
    collectors = {name: MassCollector(orders[name], grid, slots, sp.block_size, sp.density, set(sp.dense_layers), layout, loaded.device,
                                      heads[name], gathers[name])
                  for name in components}
    run_pass("building masks", collectors)
    fingerprints = loaded.fingerprints()
    plans = {}
    for name, collector in collectors.items():
        packed, achieved = collector.finish()
        # one of two experts stores the slots it runs only (it runs the others dense)
        slots_run = None if len(components) == 1 else sorted({slots[step] for step in collector.tracker.timesteps})
        if slots_run is not None:
            packed, achieved = packed[slots_run], achieved[slots_run]
        plans[name] = ComponentPlan(
            config_fingerprint=fingerprints[name],
            orders=orders[name],
            packed_masks=packed,
            num_blocks=collector.nb,
            target_density=torch.full_like(achieved, sp.density),
            achieved_density=achieved,
            recall=scores[name][0],
            incoherence=scores[name][1],
            slots_run=slots_run,
        )
    return Plan(
        model_id=loaded.model_id,
        family=loaded.family,
        grid=grid,
        text_tokens=layout.text_len,
        text_position=text_position(layout),
        block_size=sp.block_size,
        density=sp.density,
        slot_policy=sp.slots,
        slot_bounds=slot_bounds(timesteps, slots),
        calibration_timesteps=timesteps,
        dense_above_t=dense_above(timesteps, sp.dense_first_steps),
        dense_layers=list(sp.dense_layers),
        qk=recipe.precision.qk,
        pv=recipe.precision.pv,
        prompts=list(cal.prompts),
        seeds=list(cal.seeds),
        components=plans,
    )
