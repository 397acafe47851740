"""Quality benchmark: what a recipe costs in output, against dense attention and two baselines.

For a fixed prompt set and seeds, one dense run is the reference; each variant (a density and
a precision, calibrated on the recipe's calibration prompts) generates the same videos with
its plan. Per variant: PSNR, SSIM and cosine similarity against dense, and prompt fidelity
(demo/fidelity.py) where the prompts are captions of the demo world. At each density the
baselines (baselines.py) run at the first precision: no reordering and a static local window.

A mean PSNR over a few prompts is a noisy figure (on the demo model, two sets of 8 held-out
prompts ranked two allocations 3 dB apart in opposite orders: BENCHMARKS.md, 2026-12-08), so each
row also gives its per-prompt PSNRs and their standard error, and each baseline row paro's lead
over it, paired prompt by prompt (the same prompts and seeds: most of the spread between prompts
cancels).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics

import torch

from paro_kernels.orders import candidate_orders

from ..api import apply, calibrate
from ..baselines import local_window_plan
from ..calibration import CalibrationProgress
from ..demo.fidelity import fidelity, parse_caption
from ..demo.world import sample_scene, sample_scenes
from ..errors import PlanError
from ..models.loaded import token_grid
from ..plan import Plan
from ..recipe import Recipe
from ..runner import sample
from .metrics import cosine, psnr, ssim

PSNR_CAP = 100.0  # dB reported for identical videos (PSNR is infinite there; JSON has no inf)


# The demo world's prompt sets: (scene stream, noise seed of the first prompt). Held out: a stream
# no training step draws from (training seeds each step's stream with an integer, demo/train.py;
# these are strings) and noise seeds far from the recipes'. Validation: another such stream, with
# no caption among the first VALIDATION_EXCLUDES held-out ones, to choose settings on without
# looking at the held-out figures. In-sample: stream 0 and seeds from 0, the first training step's.
PROMPT_SETS = {
    "held-out": ("paro held-out evaluation", 10_000),
    "validation": ("paro validation scenes", 20_000),
    "in-sample": (0, 0),
}
VALIDATION_EXCLUDES = 64


def demo_prompts(count: int, recipe: Recipe, prompt_set: str = "held-out") -> list[str]:
    """The fixed prompt set `prompt_set` (PROMPT_SETS): captions of `count` scenes of the demo
    world. Held out and validation: scenes no training step saw, none a calibration prompt of the
    recipe or repeated (and for validation none of the held-out set's first VALIDATION_EXCLUDES).
    In-sample: scene stream 0, the first training step's."""
    g = recipe.geometry
    stream, _ = PROMPT_SETS[prompt_set]
    if prompt_set == "in-sample":
        return [s.caption for s in sample_scenes(stream, count, g.frames, g.height, g.width)]
    excluded = set(recipe.calibration.prompts)
    if prompt_set == "validation":
        excluded |= set(demo_prompts(VALIDATION_EXCLUDES, recipe))
    rng, prompts = random.Random(stream), []
    while len(prompts) < count:
        caption = sample_scene(rng, g.frames, g.height, g.width).caption
        if caption not in excluded and caption not in prompts:
            prompts.append(caption)
    return prompts


def _with(recipe: Recipe, density: float, qk: str, pv: str, orders: tuple[str, ...] | None = None) -> Recipe:
    """The recipe at another density and precision; `orders` replaces calibration.orders if given."""
    calibration = recipe.calibration if orders is None else dataclasses.replace(recipe.calibration, orders=orders)
    return dataclasses.replace(
        recipe,
        sparsity=dataclasses.replace(recipe.sparsity, density=density),
        precision=dataclasses.replace(recipe.precision, qk=qk, pv=pv),
        calibration=calibration,
    )


def plan_variant(plan: Plan) -> tuple[float, str, str]:
    """(density, qk, pv): the paro variant a ready plan stands for."""
    return plan.density, plan.qk, plan.pv


def check_given_plan(plan: Plan, recipe: Recipe) -> None:
    """A ready plan is compared with baselines calibrated from the recipe: their masks must be
    built the same way (block size, timestep slots, dense layers)."""
    sp = recipe.sparsity
    ours = (plan.block_size, plan.slot_policy, list(plan.dense_layers))
    theirs = (sp.block_size, sp.slots, list(sp.dense_layers))
    if ours != theirs:
        raise PlanError(
            f"the plan has block size / slots / dense layers {ours}, the recipe {theirs}: its baselines would not "
            "compare",
            "run with the recipe the plan was calibrated with",
        )


def _scores(videos: torch.Tensor, dense: torch.Tensor, prompts: list[str]) -> dict:
    per_video = [PSNR_CAP if p is None else min(p, PSNR_CAP) for p in (psnr(v, d) for v, d in zip(videos, dense))]
    readable = all(is_caption(p) for p in prompts)
    return {
        "psnr_db": round(statistics.mean(per_video), 3),
        "psnr_db_se": standard_error(per_video),
        "psnr_db_per_prompt": [round(p, 3) for p in per_video],
        "ssim": round(ssim(videos, dense), 5),
        "cosine": round(cosine(videos, dense), 6),
        "fidelity": round(statistics.mean(fidelity(v, p) for v, p in zip(videos, prompts)), 4) if readable else None,
    }


def standard_error(values: list[float]) -> float | None:
    """Standard error of the mean of `values` (None for fewer than 2)."""
    return round(statistics.stdev(values) / math.sqrt(len(values)), 3) if len(values) > 1 else None


def paired_leads(rows: list[dict]) -> None:
    """Adds to each baseline row paro's PSNR lead over it (dB; paro's row of the same density and
    precision), the mean of the per-prompt differences, and that mean's standard error."""
    paro = {(r["density"], r["qk"], r["pv"]): r for r in rows if r["variant"] == "paro"}
    for row in rows:
        ours = paro.get((row["density"], row["qk"], row["pv"]))
        if row["variant"] in ("dense", "paro") or ours is None:
            continue
        lead = [a - b for a, b in zip(ours["psnr_db_per_prompt"], row["psnr_db_per_prompt"])]
        row["paro_lead_db"], row["paro_lead_se"] = round(statistics.mean(lead), 3), standard_error(lead)


def is_caption(prompt: str) -> bool:
    try:
        parse_caption(prompt)
        return True
    except ValueError:
        return False


def run(
    loaded,
    recipe: Recipe,
    densities: list[float],
    precisions: list[tuple[str, str]],
    prompts: list[str],
    seeds: list[int],
    baselines: bool,
    progress,
    given: Plan | None = None,
    evaluation: str = "given prompts",
) -> tuple[dict, dict]:
    """Returns (JSON-ready result, {"dense": videos, variant name: videos, "plans": {...}}).

    `given`: a ready plan, used for the paro variant of its density and precision instead of
    calibrating one. `evaluation` names the prompt set (PROMPT_SETS, or "given prompts"), for the
    result."""
    grid = token_grid(loaded, recipe)
    steps = recipe.sampling.steps

    def generate(label: str, plan=None):
        progress.start(label, steps)
        if plan is None:
            return sample(loaded, recipe, prompts, seeds, on_step=progress.step)
        with apply(loaded, plan, backend=recipe.backend, grid=grid):
            return sample(loaded, recipe, prompts, seeds, on_step=progress.step)

    def calibrated(label: str, r: Recipe):
        """Each calibration pass its own progress row, named for the variant it calibrates."""
        return calibrate(
            loaded,
            recipe=r,
            progress=CalibrationProgress(lambda name, total: progress.start(f"{label}: {name}", total), progress.step),
        )

    dense = generate("dense")
    native = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[loaded.dtype]
    rows = [{"variant": "dense", "density": 1.0, "qk": native, "pv": native, **_scores(dense, dense, prompts)}]
    outputs = {"dense": dense, "plans": {}}
    for density in densities:
        for qk, pv in precisions:
            label = f"paro d={density} {qk}/{pv}"
            if given is not None and plan_variant(given) == (density, qk, pv):
                plan = given
            else:
                plan = calibrated(label, _with(recipe, density, qk, pv))
            outputs[label], outputs["plans"][label] = generate(label, plan), plan
            rows.append(
                {"variant": "paro", "density": density, "qk": qk, "pv": pv, **_scores(outputs[label], dense, prompts)}
            )
        if baselines:
            qk, pv = precisions[0]
            plain = calibrated(
                f"no reordering d={density}", _with(recipe, density, qk, pv, orders=(candidate_orders(grid)[0],))
            )
            for name, plan in (
                ("no reordering", plain),
                ("local window", local_window_plan(outputs["plans"][f"paro d={density} {qk}/{pv}"])),
            ):
                label = f"{name} d={density} {qk}/{pv}"
                outputs[label] = generate(label, plan)
                rows.append(
                    {"variant": name, "density": density, "qk": qk, "pv": pv, **_scores(outputs[label], dense, prompts)}
                )
    paired_leads(rows)
    dense_fidelity = rows[0]["fidelity"]
    for row in rows:
        row["fidelity_drop"] = None if dense_fidelity is None else round(dense_fidelity - row["fidelity"], 4)
    result = {
        "device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu",
        "model": loaded.model_id,
        "grid": list(grid),
        "steps": steps,
        "guidance": recipe.sampling.guidance,
        "evaluation": evaluation,
        "prompts": prompts,
        "seeds": seeds,
        "calibration_prompts": list(recipe.calibration.prompts),
        "rows": rows,
    }
    return result, outputs


def gate_failures(rows: list[dict], min_psnr: float | None, max_drop: float | None) -> list[str]:
    """One line per paro variant outside a gate (baselines are not gated)."""
    failures = []
    for row in rows:
        if row["variant"] != "paro":
            continue
        name = f"paro d={row['density']} {row['qk']}/{row['pv']}"
        if min_psnr is not None and row["psnr_db"] < min_psnr:
            failures.append(f"{name}: PSNR {row['psnr_db']:.2f} dB < --min-psnr {min_psnr}")
        if max_drop is not None and row["fidelity_drop"] is not None and 100 * row["fidelity_drop"] > max_drop:
            failures.append(f"{name}: fidelity drop {100 * row['fidelity_drop']:.1f} points > --max-drop {max_drop}")
    return failures
