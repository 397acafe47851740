"""`paro bench ...`: measurements. `e2e` times a full sampling run dense vs with a plan."""

from __future__ import annotations

from typing import Annotated, Optional

import torch
import typer

from ..backend import BACKENDS
from ..bench import e2e as e2e_bench
from ..errors import ParoError
from ..models.loading import load_model
from ..options import (BackendOpt, FramesOpt, HeightOpt, JsonOpt, ModelOpt, PlanOpt, PromptOpt, PvOpt, QkOpt, RecipeOpt,
                       SeedOpt, StepsOpt, WidthOpt, build_recipe, prompt_and_seed)
from ..output import Output
from ..plan import load_plan
from ..runner import token_grid

app = typer.Typer(help="Benchmarks: kernel speed against baselines; end-to-end speed and output difference.", no_args_is_help=True)


@app.command("e2e")
def e2e(
    plan: PlanOpt = None,
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    seed: SeedOpt = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    steps: StepsOpt = None,
    qk: QkOpt = None,
    pv: PvOpt = None,
    backend: BackendOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Time a full sampling run with dense attention and with the plan, on this device: per-step
    latency (median, first step excluded as warm-up), speed-up, and the output's distance from dense."""
    if plan is None:
        raise ParoError("bench e2e needs a plan", "pass --plan PLAN from `paro calibrate`")
    r = build_recipe(recipe, model=model, frames=frames, height=height, width=width, steps=steps, qk=qk, pv=pv, backend=backend)
    loaded_plan = load_plan(plan)
    ui = Output(as_json)
    loaded = load_model(r.model, r.sampling.dtype)
    grid = token_grid(loaded, r)
    text, seed_ = prompt_and_seed(r, prompt, seed)
    with ui.progress() as bar:
        result = e2e_bench.run(loaded, r, loaded_plan, plan, grid, text, seed_, qk, pv, bar)
    ms, psnr_db = result["paro_ms_per_step"], result["psnr_db"]
    ui.table(
        f"end to end on {result['device']}: {result['model']}, grid {'x'.join(map(str, grid))}, {r.sampling.steps} steps",
        ["attention", "ms / step", "speed-up", "PSNR vs dense (dB)", "rel. L2 vs dense"],
        [
            ["dense (stock)", f"{result['dense_ms_per_step']:.1f}", "1.00x", "-", "-"],
            [f"paro {result['backend']} d={loaded_plan.density} {result['qk']}/{result['pv']}", f"{ms:.1f}", f"{result['speedup']:.2f}x",
             psnr_db if psnr_db is not None else "identical" if result["output_rel_l2"] == 0 else "n/a", f"{result['output_rel_l2']:.4f}"],
        ],
    )
    ui.json(result)


@app.command("kernel")
def kernel(
    shape: Annotated[Optional[list[str]], typer.Option(help="Preset (cogvideox-5b, wan2.1-1.3b, flux-1024) or B,H,F,Hgrid,Wgrid,D[,T]; repeatable. Default: all presets.")] = None,
    density: Annotated[Optional[list[float]], typer.Option(help="Densities to time; repeatable. Default: 1.0 0.5 0.3 0.2.")] = None,
    precision: Annotated[Optional[list[str]], typer.Option(help="QK/PV pairs, e.g. int8/fp8; repeatable. Default: bf16/bf16 int8/fp8.")] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="Mask block size in tokens (128 matches FlexAttention's default tiles).")] = 128,
    with_statistics: Annotated[bool, typer.Option("--statistics/--no-statistics", help="Also time one CogVideoX-5B layer's calibration statistics.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Time paro's attention kernel per density and precision against SDPA flash, SDPA cuDNN and
    FlexAttention with the same block mask, in one run on this GPU (medians of do_bench)."""
    from ..bench import kernel as kb

    if not torch.cuda.is_available():
        raise ParoError("bench kernel needs a CUDA GPU", "run it on the GPU machine")
    shapes = [kb.parse_shape(s) for s in (shape or list(kb.SHAPES))]
    pairs = []
    triton = BACKENDS["triton"]
    for spec in precision or ["bf16/bf16", "int8/fp8"]:
        qk, _, pv = spec.partition("/")
        if qk not in triton.qk_formats or pv not in triton.pv_formats:
            raise ParoError(f"bad --precision {spec!r}",
                            f"use QK/PV, QK in {'|'.join(triton.qk_formats)}, PV in {'|'.join(triton.pv_formats)}")
        pairs.append((qk, pv))
    if block_size not in triton.block_sizes:
        raise ParoError(f"--block-size {block_size} is not supported", "use one of " + ", ".join(map(str, triton.block_sizes)))
    densities = density or [1.0, 0.5, 0.3, 0.2]
    if any(not 0 < d <= 1 for d in densities):
        raise ParoError(f"densities must lie in (0, 1], got {densities}", "e.g. --density 0.2")
    ui = Output(as_json)
    result = kb.run(shapes, densities, pairs, block_size, with_statistics, progress=lambda msg: ui.print(f"[dim]{msg}[/]"))

    def fmt(x, spec):
        return "skipped" if x is None else format(x, spec)

    for s in shapes:
        rows = [r for r in result["rows"] if r["shape"] == s.name]
        ui.table(
            f"{s.label()} on {result['device']}",
            ["kernel", "density", "QK/PV", "ms", "eff. TFLOPs", "vs cuDNN", "vs Flex same mask"],
            [[r["kernel"], r["density"], f"{r['qk']}/{r['pv']}", fmt(r["ms"], ".3f"), fmt(r.get("tflops_effective"), ".0f"),
              fmt(r.get("vs_cudnn"), ".2f") + ("x" if r.get("vs_cudnn") else ""),
              fmt(r.get("vs_flex_same_mask"), ".2f") + "x" if r.get("vs_flex_same_mask") else "-"]
             for r in rows],
        )
    if result["statistics"]:
        st = result["statistics"]
        ui.print(f"calibration statistics, {st['shape']}, {st['orders']} orders: {st['ms']:.1f} ms")
    for why in result["skipped"]:
        ui.print(f"[yellow]skipped[/] {why}")
    ui.json(result)
