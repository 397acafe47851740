"""Calibration: attention statistics -> one order per (layer, head) -> block masks per slot.

Dense (stock) sampling over the recipe's prompts and seeds, with two handlers (passes.py):
  1. OrderProfiler: at the profiled steps, for every candidate order, each head's mass recall at
     the target density and its block incoherence (kernels/paro_kernels/stats.py: a block's mass
     is its largest share over the call's samples, prompts and CFG branches), averaged over calls
     and steps. `rules.choose_orders` takes the best recall, and among
     orders tied with it the most coherent blocks (what quantisation needs).
  2. MassCollector: at every step, each head's block mass, normalised per row block and averaged
     within its timestep slot, becomes masks (masks.select_blocks) in the head's chosen order.
Where every candidate order's mass of every slot fits in memory (small models, short schedules:
passes.one_run_fits), one sampling run feeds both, the statistics of each call computed once;
otherwise a second run over the same prompts and seeds follows the same trajectory, collecting
only the chosen orders' mass, one slot at a time. `calibrate` below runs them and assembles the
plan.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from paro_kernels.orders import candidate_orders

from .. import runner
from ..errors import ParoError
from ..intercept import routed
from ..models.loaded import LoadedModel, token_grid
from ..parallel import gather_heads, local_heads
from ..plan import ComponentPlan, Plan, make_plan
from ..recipe import Recipe
from .passes import MassCollector, OrderProfiler, one_run_fits
from .rules import allowed_orders, choose_orders, dense_above, profiled_steps, slot_bounds, slot_of_steps


@dataclass
class CalibrationProgress:
    """Callbacks for a UI: start(pass_name, total_steps) then step(i) per denoising step."""

    start: Callable[[str, int], None] = lambda name, total: None
    step: Callable[[int], None] = lambda i: None


def calibrate(loaded: LoadedModel, recipe: Recipe, progress: CalibrationProgress | None = None) -> Plan:
    """Profile the model on the recipe's prompts and seeds and return its plan: one component
    per transformer (Wan 2.2's two experts each get theirs, from the steps each one runs)."""
    progress = progress or CalibrationProgress()
    sp, components = recipe.sparsity, loaded.components
    layers = {name: len(loaded.adapter.attention_layers(tr)) for name, tr in components.items()}
    _check_dense_layers(sp.dense_layers, min(layers.values()))
    grid = token_grid(loaded, recipe)
    names = candidate_orders(grid)
    allowed = allowed_orders(recipe.calibration.orders, names)  # a bad list fails now, before any sampling
    heads = {name: local_heads(tr, loaded.adapter.num_heads(tr)) for name, tr in components.items()}  # this rank's
    gathers = {name: functools.partial(gather_heads, tr) for name, tr in components.items()}

    profilers = {
        name: OrderProfiler(
            layers[name],
            len(range(loaded.adapter.num_heads(tr))[heads[name]]),
            sp.block_size,
            sp.density,
            profiled_steps(recipe.sampling.steps, recipe.calibration.order_steps) if len(allowed) > 1 else set(),
            [names[i] for i in allowed],
            gathers[name],
        )
        for name, tr in components.items()
    }
    slots = slot_of_steps(recipe.sampling.steps, sp.slots)

    def collector(name: str, candidates, profiler=None, layout=None) -> MassCollector:
        num_heads = loaded.adapter.num_heads(components[name])
        return MassCollector(
            candidates, grid, slots, sp.block_size, sp.density, set(sp.dense_layers), loaded.device, num_heads,
            gathers[name], profiler, layout, sp.allocation,
        )  # fmt: skip

    most_heads = max(loaded.adapter.num_heads(tr) for tr in components.values())
    one_run = one_run_fits(max(slots) + 1, sum(layers.values()), len(allowed), most_heads, grid, sp.block_size)
    if one_run:  # every candidate order's mass, the profilers fed from the same statistics
        collectors = {
            name: collector(name, [profiler.candidates()] * layers[name], profiler)
            for name, profiler in profilers.items()
        }
        _run_pass(loaded, recipe, "profiling orders and masks", collectors, progress)
    else:
        _run_pass(loaded, recipe, "profiling orders", profilers, progress)
    chosen = {
        name: _chosen_orders(name, profiler, loaded, recipe, names, allowed, layers[name])
        for name, profiler in profilers.items()
    }
    if not one_run:  # each head's chosen order alone, on the same trajectory
        layout = _layout(profilers)
        collectors = {
            name: collector(name, [[row[heads[name]]] for row in chosen[name][0]], layout=layout) for name in components
        }
        _run_pass(loaded, recipe, "building masks", collectors, progress)
    choices = {
        name: torch.tensor([[profilers[name].orders.index(o) for o in row] for row in chosen[name][0]])
        if one_run
        else None
        for name in components
    }

    schedule = {step: t for profiler in profilers.values() for step, t in profiler.tracker.timesteps.items()}
    timesteps = [schedule[i] for i in sorted(schedule)]
    if len(timesteps) != len(slots):
        raise ParoError(
            f"the sampler ran {len(timesteps)} denoising steps, the recipe asks for {len(slots)}",
            "set sampling.steps to the steps this pipeline runs",
        )
    fingerprints = loaded.fingerprints()
    plans = {
        name: _component(
            collector, choices[name], chosen[name], fingerprints[name], slots, sp.density, len(components) > 1
        )
        for name, collector in collectors.items()
    }
    return make_plan(
        model_id=loaded.model_id,
        family=loaded.family,
        grid=grid,
        layout=_layout(profilers),
        block_size=sp.block_size,
        density=sp.density,
        qk=recipe.precision.qk,
        pv=recipe.precision.pv,
        components=plans,
        slot_policy=sp.slots,
        slot_bounds=slot_bounds(timesteps, slots),
        calibration_timesteps=timesteps,
        dense_above_t=dense_above(timesteps, sp.dense_first_steps),
        dense_layers=list(sp.dense_layers),
        prompts=list(recipe.calibration.prompts),
        seeds=list(recipe.calibration.seeds),
        allocation=sp.allocation,
    )


def _check_dense_layers(dense_layers: tuple[int, ...], fewest: int) -> None:
    bad = [i for i in dense_layers if i >= fewest]
    if bad:
        raise ParoError(
            f"sparsity.dense_layers has layer {bad[0]}, the model has {fewest} (0..{fewest - 1})", "fix the recipe"
        )


def _run_pass(loaded: LoadedModel, recipe: Recipe, name: str, handlers: dict, progress: CalibrationProgress) -> None:
    """One dense sampling run over every calibration prompt and seed, `handlers` (one per
    component) seeing each self-attention call; they learn of each finished step."""
    cal = recipe.calibration
    prompts = [p for p in cal.prompts for _ in cal.seeds]
    seeds = [s for _ in cal.prompts for s in cal.seeds]
    progress.start(name, recipe.sampling.steps)

    def step_done(i: int) -> None:
        for handler in handlers.values():
            handler.step_done()
        progress.step(i)

    with routed(loaded.components, loaded.adapter, handlers):
        runner.sample(loaded, recipe, prompts, seeds, decode=False, on_step=step_done)


def _chosen_orders(
    name: str,
    profiler: OrderProfiler,
    loaded: LoadedModel,
    recipe: Recipe,
    names: list[str],
    allowed: list[int],
    layers: int,
):
    """(orders [layer][head], (recall, incoherence)) of one component from its profile; `names`
    are the grid's candidate orders, `allowed` the indices of those the recipe allows (the ones
    profiled; the scores of the others are NaN)."""
    shape = (layers, loaded.adapter.num_heads(loaded.components[name]), len(names))
    recall, incoherence = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    if not profiler.tracker.timesteps or len(allowed) == 1:  # an expert this schedule never runs (its
        # masks stay dense), or nothing to choose: the first allowed order
        return [[names[allowed[0]]] * shape[1] for _ in range(layers)], (recall, incoherence)
    if profiler.count.sum() == 0:
        raise ParoError(
            f"no profiled step ran the model's {name}",
            "profile more steps: raise calibration.order_steps, or null for all",
        )
    recall[..., allowed], incoherence[..., allowed] = profiler.scores()
    chosen = choose_orders(recall[..., allowed], incoherence[..., allowed], recipe.sparsity.density, recipe.quantised)
    return [[names[allowed[i]] for i in row] for row in chosen.tolist()], (recall, incoherence)


def _layout(profilers: dict[str, OrderProfiler]):
    """The text layout of the calibration run's calls (the first component that ran)."""
    return next(p.tracker.layout for p in profilers.values() if p.tracker.layout is not None)


def _component(
    collector: MassCollector, choice, chosen, fingerprint: str, slots: list[int], density: float, one_of_two: bool
) -> ComponentPlan:
    """A component's plan from its finished mask collection (`choice`: each head's candidate when
    the collector holds several); one of two experts stores only the slots it runs (it runs the
    others dense)."""
    orders, (recall, incoherence) = chosen
    packed, achieved = collector.finish(choice)
    slots_run = sorted({slots[step] for step in collector.tracker.timesteps}) if one_of_two else None
    if slots_run is not None:
        packed, achieved = packed[slots_run], achieved[slots_run]
    return ComponentPlan(
        config_fingerprint=fingerprint,
        orders=orders,
        packed_masks=packed,
        num_blocks=collector.nb,
        target_density=torch.full_like(achieved, density),
        achieved_density=achieved,
        recall=recall,
        incoherence=incoherence,
        slots_run=slots_run,
    )
