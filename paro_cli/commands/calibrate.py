"""`paro calibrate`: profile every attention head, choose orders and masks, write a plan."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from ..calibration import CalibrationProgress, calibrate
from ..errors import ParoError
from ..models.loading import load_model
from ..options import (BlockOpt, DensityOpt, FramesOpt, GuidanceOpt, HeightOpt, JsonOpt, ModelOpt, PvOpt, QkOpt,
                       RecipeOpt, StepsOpt, WidthOpt, build_recipe)
from ..output import Output


def command(
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    density: DensityOpt = None,
    block_size: BlockOpt = None,
    qk: QkOpt = None,
    pv: PvOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Plan file to write (.safetensors).")] = Path("plan.safetensors"),
    as_json: JsonOpt = False,
) -> None:
    """Run the model on the recipe's calibration prompts, pick a token order per attention head and
    block-sparse masks at the recipe's density, and write them to one plan file."""
    r = build_recipe(recipe, model=model, frames=frames, height=height, width=width, steps=steps, guidance=guidance,
                     density=density, block_size=block_size, qk=qk, pv=pv)
    if out.suffix != ".safetensors":
        raise ParoError(f"plan path {out} must end in .safetensors", "e.g. --out plan.safetensors")
    if not out.parent.is_dir():
        raise ParoError(f"output folder {out.parent} does not exist", "create it or choose another --out")
    ui = Output(as_json)
    loaded = load_model(r.model, r.sampling.dtype)
    start = time.perf_counter()
    with ui.progress() as bar:
        plan = calibrate(loaded, r, CalibrationProgress(bar.start, bar.step))
    seconds = time.perf_counter() - start
    plan.save(out)

    comp = plan.components["transformer"]
    rows = []
    for layer, orders in enumerate(comp.orders):
        counts = Counter(orders)
        density_ = comp.achieved_density[:, layer]
        rows.append([layer, " ".join(f"{o}x{n}" for o, n in counts.most_common()), f"{density_.mean():.3f}",
                     f"{density_.min():.3f}-{density_.max():.3f}"])
    ui.table(f"plan for {plan.model_id}: grid {'x'.join(map(str, plan.grid))}, {plan.num_slots} slots",
             ["layer", "orders", "mean density", "head range"], rows)
    ui.print(f"wrote [bold]{out}[/] in {seconds:.1f} s")
    ui.json({"path": str(out), "seconds": round(seconds, 3), **plan.summary()})
