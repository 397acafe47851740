"""`paro calibrate`: profile every attention head, choose orders and masks, write a plan."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .. import parallel
from ..api import as_loaded, calibrate
from ..calibration import CalibrationProgress
from ..errors import ParoError
from ..fileio import check_output_file
from ..models.loaded import token_grid
from ..models.loading import load_model
from ..options import (
    AllocationOpt,
    BlockOpt,
    DensityOpt,
    FramesOpt,
    GpusOpt,
    GuidanceOpt,
    HeightOpt,
    ImageOpt,
    JsonOpt,
    ModelOpt,
    PvOpt,
    QkOpt,
    RecipeOpt,
    StepsOpt,
    WidthOpt,
    build_recipe,
    image_kwargs,
)
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
    allocation: AllocationOpt = None,
    qk: QkOpt = None,
    pv: PvOpt = None,
    image: ImageOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Plan file to write (.safetensors).")] = Path(
        "plan.safetensors"
    ),
    gpus: GpusOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Run the model on the recipe's calibration prompts, pick a token order per attention head and
    block-sparse masks at the recipe's density, and write them to one plan file."""
    r = build_recipe(
        recipe,
        model=model,
        frames=frames,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        density=density,
        block_size=block_size,
        allocation=allocation,
        qk=qk,
        pv=pv,
    )
    if out.suffix != ".safetensors":
        raise ParoError(f"plan path {out} must end in .safetensors", "e.g. --out plan.safetensors")
    check_output_file(out)
    call_kwargs = image_kwargs(image)
    parallel.run(gpus, _calibrate, r, call_kwargs, out, as_json, recipe=r)


def _calibrate(r, call_kwargs: dict | None, out: Path, as_json: bool) -> None:
    """The calibration itself, in each worker process with --gpus: every rank profiles its heads
    (parallel.py), and all choose the same plan from the gathered statistics; rank 0 writes it."""
    ui = Output(as_json, silent=not parallel.is_primary())
    loaded = as_loaded(load_model(r.model, r.sampling.dtype), call_kwargs)
    parallel.enable_ulysses(loaded, token_grid(loaded, r))
    if parallel.world_size() > 1:
        ui.print(parallel.rank_share(loaded))
    start = time.perf_counter()
    with ui.progress() as bar:
        plan = calibrate(loaded, recipe=r, progress=CalibrationProgress(bar.start, bar.step))
    seconds = time.perf_counter() - start
    if not parallel.is_primary():
        return
    plan.save(out)

    for name in plan.components:
        ui.table(
            f"{name} of {plan.model_id}: grid {'x'.join(map(str, plan.grid))}, {plan.num_slots} timestep slots, "
            f"{plan.allocation} allocation",
            *plan.layer_table(name),
        )
    gpus = f" on {parallel.world_size()} GPUs" if parallel.world_size() > 1 else ""
    ui.print(f"wrote [bold]{out}[/] in {seconds:.1f} s{gpus}")
    ui.json({"path": str(out), "seconds": round(seconds, 3), "gpus": parallel.world_size(), **plan.summary()})
