"""`paro generate`: sample a video with a plan's attention (or dense without one) and write it."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

import typer

from .. import parallel
from ..api import apply, as_loaded
from ..compiled import compiled_forwards
from ..media import check_video_path, write_video
from ..models.loaded import token_grid
from ..models.loading import load_model
from ..options import (
    BackendOpt,
    FramesOpt,
    GpusOpt,
    GuidanceOpt,
    HeightOpt,
    ImageOpt,
    JsonOpt,
    ModelOpt,
    PlanOpt,
    PromptOpt,
    PvOpt,
    QkOpt,
    RecipeOpt,
    SeedOpt,
    StepsOpt,
    WidthOpt,
    build_recipe,
    image_kwargs,
    prompt_and_seed,
)
from ..output import Output
from ..plan import load_plan
from ..runner import check_decodable, sample


def command(
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    plan: PlanOpt = None,
    prompt: PromptOpt = None,
    seed: SeedOpt = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    qk: QkOpt = None,
    pv: PvOpt = None,
    backend: BackendOpt = None,
    image: ImageOpt = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output file: .mp4, .gif, or .png (frames side by side).")
    ] = Path("video.mp4"),
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile/--eager",
            help="torch.compile the transformer(s) with paro's kernels in the graph: the first steps compile (a "
            "minute or more at full size), the rest run faster.",
        ),
    ] = False,
    gpus: GpusOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Generate a video with the plan's reordered, block-sparse attention (dense without --plan).

    The plan fixes orders, masks, density and precision (--qk/--pv override the precision); the
    recipe gives model, geometry, sampling and backend."""
    r = build_recipe(
        recipe,
        model=model,
        frames=frames,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        qk=qk,
        pv=pv,
        backend=backend,
    )
    check_video_path(out)
    call_kwargs = image_kwargs(image)
    parallel.run(gpus, _generate, r, plan, prompt, seed, qk, pv, call_kwargs, out, compile_, as_json, recipe=r)


def _generate(
    r, plan: str | None, prompt, seed, qk, pv, call_kwargs: dict | None, out: Path, compile_: bool, as_json: bool
) -> None:
    """The run itself, in each worker process with --gpus (rank 0 writes and prints)."""
    loaded_plan = load_plan(plan) if plan else None
    ui = Output(as_json, silent=not parallel.is_primary())
    loaded = as_loaded(load_model(r.model, r.sampling.dtype), call_kwargs)
    check_decodable(loaded)
    grid = token_grid(loaded, r)
    parallel.enable_ulysses(loaded, grid)
    if parallel.world_size() > 1:
        ui.print(parallel.rank_share(loaded))
    text, seed_ = prompt_and_seed(r, prompt, seed)
    attention = (
        apply(loaded, loaded_plan, backend=r.backend, qk=qk, pv=pv, grid=grid)
        if loaded_plan
        else contextlib.nullcontext()
    )
    # graph breaks allowed: a pipeline's transformer may hold code dynamo cannot trace whole
    compiled = compiled_forwards(loaded.components.values(), fullgraph=False) if compile_ else contextlib.nullcontext()
    start = time.perf_counter()
    with attention as applied, compiled, ui.progress() as bar:
        bar.start("generating", r.sampling.steps)
        video = sample(loaded, r, [text], [seed_], on_step=bar.step)
    seconds = time.perf_counter() - start
    if not parallel.is_primary():
        return
    write_video(video[0].numpy(), out, r.sampling.fps)
    f, h, w, _ = video[0].shape
    mode = f"plan {plan} via {applied.backend.name} ({applied.qk}/{applied.pv})" if loaded_plan else "dense attention"
    mode += ", compiled" if compile_ else ""
    mode += f", {parallel.world_size()} GPUs" if parallel.world_size() > 1 else ""
    ui.print(f"wrote [bold]{out}[/]: {f} frames {w}x{h}, {r.sampling.steps} steps in {seconds:.1f} s, {mode}")
    ui.json(
        {
            "path": str(out),
            "frames": f,
            "height": h,
            "width": w,
            "steps": r.sampling.steps,
            "seconds": round(seconds, 3),
            "prompt": text,
            "seed": seed_,
            "plan": plan,
            "backend": applied.backend.name if loaded_plan else None,
            "compiled": compile_,
            "gpus": parallel.world_size(),
            "attention_calls": dict(applied.calls) if loaded_plan else None,
        }
    )
