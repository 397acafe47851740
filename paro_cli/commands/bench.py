"""`paro bench ...`: measurements. `e2e` times a full sampling run dense vs with a plan."""

from __future__ import annotations

import math
import statistics
import time
from typing import Annotated, Optional

import torch
import typer

from ..backend import BACKENDS, use_plan
from ..errors import ParoError
from ..models.loading import load_model
from ..options import (BackendOpt, FramesOpt, HeightOpt, JsonOpt, ModelOpt, PlanOpt, PromptOpt, PvOpt, QkOpt, RecipeOpt,
                       SeedOpt, StepsOpt, WidthOpt, build_recipe, prompt_and_seed)
from ..output import Output
from ..plan import load_plan
from ..runner import decodable, sample, token_grid

app = typer.Typer(help="Benchmarks: kernel speed against baselines; end-to-end speed and output difference.", no_args_is_help=True)


def _timed_sample(loaded, recipe, prompt, seed, label, bar):
    """Run sampling, returning (output, per-step seconds); CUDA work is synchronised per step."""
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    marks = []

    def on_step(i):
        sync()
        marks.append(time.perf_counter())
        bar.step(i)

    bar.start(label, recipe.sampling.steps)
    sync()
    start = time.perf_counter()
    out = sample(loaded, recipe, [prompt], [seed], on_step=on_step, decode=decodable(loaded))
    steps = [b - a for a, b in zip([start] + marks[:-1], marks)]
    return out, steps


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR in dB of 8-bit videos; None when they are identical (infinite)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


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
    """Time a full sampling run with dense attention and with the plan, on this device; report the
    per-step latency (median, first step excluded as warm-up when there are several), the speed-up
    and how far the plan's output is from dense."""
    if plan is None:
        raise ParoError("bench e2e needs a plan", "pass --plan PLAN from `paro calibrate`")
    r = build_recipe(recipe, model=model, frames=frames, height=height, width=width, steps=steps, qk=qk, pv=pv, backend=backend)
    loaded_plan = load_plan(plan)
    ui = Output(as_json)
    loaded = load_model(r.model, r.sampling.dtype)
    grid = token_grid(loaded, r)
    text, seed_ = prompt_and_seed(r, prompt, seed)
    with ui.progress() as bar:
        dense_out, dense_steps = _timed_sample(loaded, r, text, seed_, "dense", bar)
        with use_plan(loaded, loaded_plan, grid, r.backend, qk, pv) as handler:
            paro_out, paro_steps = _timed_sample(loaded, r, text, seed_, "paro", bar)

    def median_ms(times):
        return 1000 * statistics.median(times[1:] if len(times) > 1 else times)

    dense_ms, paro_ms = median_ms(dense_steps), median_ms(paro_steps)
    rel_l2 = ((paro_out.double() - dense_out.double()).norm() / dense_out.double().norm().clamp_min(1e-12)).item()
    result = {
        "device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu",
        "model": loaded.model_id,
        "plan": plan,
        "grid": list(grid),
        "steps": r.sampling.steps,
        "backend": handler.backend.name,
        "qk": handler.qk,
        "pv": handler.pv,
        "plan_density": loaded_plan.density,
        "dense_ms_per_step": round(dense_ms, 3),
        "paro_ms_per_step": round(paro_ms, 3),
        "speedup": round(dense_ms / paro_ms, 4),
        "output_rel_l2": round(rel_l2, 6),
        "psnr_db": _round(psnr(paro_out, dense_out)) if dense_out.dtype == torch.uint8 else None,
        "attention_calls": dict(handler.calls),
    }
    ui.table(
        f"end to end on {result['device']}: {result['model']}, grid {'x'.join(map(str, grid))}, {r.sampling.steps} steps",
        ["attention", "ms / step", "speed-up", "PSNR vs dense (dB)", "rel. L2 vs dense"],
        [
            ["dense (stock)", f"{dense_ms:.1f}", "1.00x", "-", "-"],
            [f"paro {handler.backend.name} d={loaded_plan.density} {handler.qk}/{handler.pv}", f"{paro_ms:.1f}",
             f"{result['speedup']:.2f}x", result["psnr_db"] if result["psnr_db"] is not None else "identical" if rel_l2 == 0 else "n/a",
             f"{rel_l2:.4f}"],
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
