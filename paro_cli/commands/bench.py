"""`paro bench ...`: measurements. `kernel` times the attention kernel against the baselines on
a GPU, `e2e` a full sampling run dense vs with a plan, `quality` what recipes cost in output."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from .. import parallel
from ..api import as_loaded
from ..backends import BACKENDS
from ..bench import e2e as e2e_bench
from ..bench.quality import PROMPT_SETS
from ..errors import GateFailed, ParoError
from ..models.architectures import ARCHITECTURES, build_architecture, check_architecture, step_inputs
from ..models.loaded import token_grid
from ..models.loading import load_model, resolve_device
from ..options import (
    AllocationOpt,
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
from ..plan_attention import check_plan
from ..recipe import load_recipe

app = typer.Typer(
    help="Benchmarks: kernel speed against baselines; end-to-end speed; output quality against dense.",
    no_args_is_help=True,
)


def parse_precisions(specs: list[str], qk_formats, pv_formats) -> list[tuple[str, str]]:
    """QK/PV pairs from --precision values like int8/fp8."""
    pairs = []
    for spec in specs:
        qk, _, pv = spec.partition("/")
        if qk not in qk_formats or pv not in pv_formats:
            raise ParoError(
                f"bad --precision {spec!r}", f"use QK/PV, QK in {'|'.join(qk_formats)}, PV in {'|'.join(pv_formats)}"
            )
        pairs.append((qk, pv))
    return pairs


def check_densities(densities: list[float]) -> list[float]:
    if any(not 0 < d <= 1 for d in densities):
        raise ParoError(f"densities must lie in (0, 1], got {densities}", "e.g. --density 0.3")
    return densities


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
    image: ImageOpt = None,
    architecture: Annotated[
        str | None,
        typer.Option(
            help="Instead of a plan's run: time one denoising step of this full-size architecture with random weights ("
            + ", ".join(ARCHITECTURES)
            + "), dense against synthetic plans, at its recipe's geometry."
        ),
    ] = None,
    density: Annotated[
        list[float] | None,
        typer.Option(help="With --architecture: densities to time; repeatable. Default: 0.5 0.3 0.2."),
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option(help="With --architecture: QK/PV pairs; repeatable. Default: bf16/bf16 int8/fp8."),
    ] = None,
    compile_: Annotated[
        bool,
        typer.Option(
            "--compile/--eager",
            help="With --architecture: torch.compile the transformer (fullgraph; with --gpus, graph breaks allowed), "
            "the dense baseline too.",
        ),
    ] = False,
    repeats: Annotated[
        int,
        typer.Option(
            help="With --architecture: timed steps per variant (after two untimed ones); the median is reported."
        ),
    ] = 5,
    block_size: Annotated[
        int, typer.Option("--block-size", help="With --architecture: the synthetic plans' block size.")
    ] = 128,
    allocation: Annotated[
        str,
        typer.Option(
            help="With --architecture: the synthetic plans' blocks per head: layer (the density in every head) or "
            "global (per-head densities spread as a global allocation spreads them, the same total)."
        ),
    ] = "layer",
    gpus: GpusOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Time a full sampling run with dense attention and with the plan, on this device: per-step
    latency (median, first step excluded as warm-up), speed-up, and the output's distance from dense.
    With --architecture: one denoising step of a full-size model (random weights), dense and with
    plans of each density and precision, and the share of the step spent in attention; with
    --gpus N as well, each variant's step on one GPU and on N, and their outputs' distance."""
    if architecture is not None:
        _architecture_steps(
            architecture,
            density,
            precision,
            compile_,
            repeats,
            block_size,
            backend or "auto",
            gpus,
            as_json,
            allocation,
        )
        return
    if plan is None:
        raise ParoError("bench e2e needs a plan", "pass --plan PLAN from `paro calibrate`, or --architecture NAME")
    r = build_recipe(
        recipe, model=model, frames=frames, height=height, width=width, steps=steps, qk=qk, pv=pv, backend=backend
    )
    call_kwargs = image_kwargs(image)
    parallel.run(gpus, _plan_e2e, r, plan, prompt, seed, qk, pv, call_kwargs, as_json, recipe=r)


def _plan_e2e(r, plan: str, prompt, seed, qk, pv, call_kwargs: dict | None, as_json: bool) -> None:
    """The benchmark itself, in each worker process with --gpus (rank 0 prints)."""
    ui = Output(as_json, silent=not parallel.is_primary())
    loaded_plan = load_plan(plan)
    loaded = as_loaded(load_model(r.model, r.sampling.dtype), call_kwargs)
    grid = token_grid(loaded, r)
    check_plan(loaded, loaded_plan, grid)  # before the dense run, not after it
    parallel.enable_ulysses(loaded, grid)
    if parallel.world_size() > 1:
        ui.print(parallel.rank_share(loaded))
    text, seed_ = prompt_and_seed(r, prompt, seed)
    with ui.progress() as bar:
        result = e2e_bench.run(loaded, r, loaded_plan, plan, grid, text, seed_, qk, pv, bar)
    result["gpus"] = parallel.world_size()
    ms, psnr_db = result["paro_ms_per_step"], result["psnr_db"]
    ui.table(
        f"end to end on {result['gpus']} x {result['device']}: {result['model']}, grid {'x'.join(map(str, grid))}, "
        f"{r.sampling.steps} steps",
        ["attention", "ms / step", "speed-up", "PSNR vs dense (dB)", "rel. L2 vs dense"],
        [
            ["dense (stock)", f"{result['dense_ms_per_step']:.1f}", "1.00x", "-", "-"],
            [
                f"paro {result['backend']} d={loaded_plan.density} {result['qk']}/{result['pv']}",
                f"{ms:.1f}",
                f"{result['speedup']:.2f}x",
                psnr_db if psnr_db is not None else "identical" if result["output_rel_l2"] == 0 else "n/a",
                f"{result['output_rel_l2']:.4f}",
            ],
        ],
    )
    ui.json(result)


def _architecture_steps(
    name: str,
    density,
    precision,
    compiled: bool,
    repeats: int,
    block: int,
    backend: str,
    gpus: int,
    as_json: bool,
    allocation: str,
) -> None:
    if allocation not in ("layer", "global"):
        raise ParoError(f"--allocation {allocation!r} is not an allocation", "use layer or global")
    if repeats < 1:
        raise ParoError(f"--repeats {repeats} is not a count of timings", "pass --repeats 1 or more")
    check_architecture(name)  # before any worker starts
    densities = check_densities(density or [0.5, 0.3, 0.2])
    pairs = parse_precisions(
        precision or ["bf16/bf16", "int8/fp8"], BACKENDS["torch"].qk_formats, BACKENDS["torch"].pv_formats
    )
    count = parallel.processes(gpus)
    if count > 1:  # refused before any process builds the weights: the architecture on the meta device
        meta = build_architecture(name, torch.device("meta"))
        grid, inputs = step_inputs(meta, name, load_recipe(name))
        parallel.check_ulysses(meta, count, grid, meta.adapter.sequence_layout((), inputs).text_len)
    parallel.run(
        gpus, _architecture_job, name, densities, pairs, compiled, repeats, block, backend, as_json, allocation
    )


def _architecture_job(
    name: str, densities, pairs, compiled: bool, repeats: int, block: int, backend: str, as_json: bool, allocation: str
) -> None:
    """The step benchmark, in each worker process with --gpus (rank 0 prints)."""
    from ..bench import step as step_bench

    ui = Output(as_json, silent=not parallel.is_primary())
    loaded = build_architecture(name, resolve_device())
    grid, inputs = step_inputs(loaded, name, load_recipe(name))
    report = lambda msg: ui.print(f"[dim]{msg}[/]")  # noqa: E731  (a line of progress: what is timed now)
    title = f"{name} (random weights), one step, grid {'x'.join(map(str, grid))}, {allocation} allocation"
    if parallel.world_size() > 1:
        result = step_bench.scaling(
            loaded, inputs, grid, densities, pairs, block, repeats, backend, report, allocation, compiled
        )
        if not parallel.is_primary():  # only rank 0 has the one-GPU figures
            return
        result["architecture"], result["allocation"] = name, allocation
        ui.table(
            f"{title} + {result['text_tokens']} text, batch {result['batch']}, "
            f"{'compiled' if compiled else 'eager'}, on {result['gpus']} x "
            f"{result['device']} "
            "(Ulysses) against 1",
            [
                "variant",
                "density",
                "QK/PV",
                f"ms / step, {result['gpus']} GPUs",
                "ms / step, 1 GPU",
                "time vs 1 GPU",
                "output rel. L2 vs 1 GPU",
            ],
            [
                [
                    r["variant"],
                    r["density"],
                    "-" if r["qk"] is None else f"{r['qk']}/{r['pv']}",
                    f"{r['ms']:.1f}",
                    f"{r['ms_1gpu']:.1f}",
                    f"{r['time_vs_1gpu']:.3f}x",
                    f"{r['output_rel_l2_vs_1gpu']:.2e}",
                ]
                for r in result["rows"]
            ],
        )
        ui.json(result)
        return
    result = step_bench.run(
        loaded, inputs, grid, densities, pairs, block, compiled, repeats, backend, report=report, allocation=allocation
    )
    result["architecture"], result["allocation"] = name, allocation
    dense = result["rows"][0]["ms"]
    ui.table(
        f"{title} + {result['text_tokens']} text, batch {result['batch']}, "
        f"{'compiled' if compiled else 'eager'}, on {result['device']}: "
        f"attention {100 * result['attention_share_dense']:.0f}% of the dense step",
        ["variant", "density", "QK/PV", "ms / step", "range", "vs dense"],
        [
            [
                r["variant"],
                "-" if r["density"] is None else r["density"],
                "-" if r["qk"] is None else f"{r['qk']}/{r['pv']}",
                f"{r['ms']:.1f}",
                "{:.1f}-{:.1f}".format(*r["ms_range"]),
                f"{dense / r['ms']:.2f}x",
            ]
            for r in result["rows"]
        ],
    )
    ui.json(result)


@app.command("kernel")
def kernel(
    shape: Annotated[
        list[str] | None,
        typer.Option(
            help="Preset (cogvideox-5b, wan2.1-1.3b, flux-1024) or B,H,F,Hgrid,Wgrid,D[,T]; repeatable. Default: all "
            "presets."
        ),
    ] = None,
    density: Annotated[
        list[float] | None, typer.Option(help="Densities to time; repeatable. Default: 1.0 0.5 0.3 0.2.")
    ] = None,
    precision: Annotated[
        list[str] | None, typer.Option(help="QK/PV pairs, e.g. int8/fp8; repeatable. Default: bf16/bf16 int8/fp8.")
    ] = None,
    block_size: Annotated[
        int, typer.Option("--block-size", help="Mask block size in tokens (128 matches FlexAttention's default tiles).")
    ] = 128,
    with_statistics: Annotated[
        bool,
        typer.Option("--statistics/--no-statistics", help="Also time one CogVideoX-5B layer's calibration statistics."),
    ] = True,
    repeats: Annotated[
        int,
        typer.Option(
            help="Timings per call, in interleaved rounds over all of a shape's calls; the median is reported."
        ),
    ] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Time paro's attention kernel per density and precision against SDPA flash, SDPA cuDNN and
    FlexAttention with the same block mask, in one run on this GPU (medians of do_bench, each
    call timed --repeats times in interleaved rounds)."""
    from ..bench import kernel as kb

    if repeats < 1:
        raise ParoError(f"--repeats {repeats} is not a count of timings", "pass --repeats 1 or more")
    if not torch.cuda.is_available():
        raise ParoError("bench kernel needs a CUDA GPU", "run it on the GPU machine")
    shapes = [kb.parse_shape(s) for s in (shape or list(kb.SHAPES))]
    triton = BACKENDS["triton"]
    pairs = parse_precisions(precision or ["bf16/bf16", "int8/fp8"], triton.qk_formats, triton.pv_formats)
    if block_size not in triton.block_sizes:
        raise ParoError(
            f"--block-size {block_size} is not supported", "use one of " + ", ".join(map(str, triton.block_sizes))
        )
    densities = check_densities(density or [1.0, 0.5, 0.3, 0.2])
    ui = Output(as_json)
    result = kb.run(
        shapes, densities, pairs, block_size, with_statistics, repeats, report=lambda msg: ui.print(f"[dim]{msg}[/]")
    )

    def fmt(x, spec):
        return "skipped" if x is None else format(x, spec)

    for s in shapes:
        rows = [r for r in result["rows"] if r["shape"] == s.name]
        ui.table(
            f"{s.label()} on {result['device']}",
            ["kernel", "density", "QK/PV", "ms", "ms range", "eff. TFLOPs", "vs cuDNN", "vs Flex same mask"],
            [
                [
                    r["kernel"],
                    r["density"],
                    f"{r['qk']}/{r['pv']}",
                    fmt(r["ms"], ".3f"),
                    "-" if r["ms"] is None else "{:.3f}-{:.3f}".format(*r["ms_range"]),
                    fmt(r.get("tflops_effective"), ".0f"),
                    fmt(r.get("vs_cudnn"), ".2f") + ("x" if r.get("vs_cudnn") else ""),
                    fmt(r.get("vs_flex_same_mask"), ".2f") + "x" if r.get("vs_flex_same_mask") else "-",
                ]
                for r in rows
            ],
        )
    if result["statistics"]:
        st = result["statistics"]
        ui.print(f"calibration statistics, {st['shape']}, {st['orders']} orders: {st['ms']:.1f} ms")
    for why in result["skipped"]:
        ui.print(f"[yellow]skipped[/] {why}")
    ui.json(result)


def _with_error(value: float, error: float | None, fmt: str) -> str:
    """A mean and its standard error as the quality table shows them ("24.54 ± 0.61")."""
    return fmt.format(value) + ("" if error is None else f" ± {error:.2f}")


@app.command("quality")
def quality(
    recipe: RecipeOpt = None,
    model: ModelOpt = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    allocation: AllocationOpt = None,
    backend: BackendOpt = None,
    image: ImageOpt = None,
    density: Annotated[
        list[float] | None, typer.Option(help="Densities to measure; repeatable. Default: the recipe's.")
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option(help="QK/PV pairs, e.g. fp32/fp32 or int8/fp8; repeatable. Default: the recipe's."),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option(help="Prompts to generate; repeatable. Default: the demo world's fixed set (--prompts of them)."),
    ] = None,
    prompts: Annotated[int, typer.Option(help="Size of the demo world's fixed prompt set.")] = 8,
    prompt_set: Annotated[
        str,
        typer.Option(
            help="The demo world's prompt set: held-out (scenes no training step drew, none a calibration prompt; "
            "seeds from 10000), validation (another such set, to choose settings on; seeds from 20000) or in-sample "
            "(the demo model's first training step's scenes, seeds from 0: they overlap the calibration data)."
        ),
    ] = "held-out",
    seed: Annotated[
        int | None,
        typer.Option(help="Noise seed of the first prompt; prompt i uses seed + i. Default: the prompt set's."),
    ] = None,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines/--no-baselines", help="Also run no reordering and a static local window at each density."
        ),
    ] = True,
    video: Annotated[
        Path | None,
        typer.Option(
            help="Write the first prompt's video as dense | first paro variant, side by side (.mp4/.gif/.png)."
        ),
    ] = None,
    heatmaps: Annotated[
        Path | None, typer.Option(help="Folder for PNG heat maps of one head's attention before/after reordering.")
    ] = None,
    layer: Annotated[int, typer.Option(help="Layer of the heat maps.")] = 0,
    head: Annotated[int, typer.Option(help="Head of the heat maps.")] = 0,
    min_psnr: Annotated[
        float | None, typer.Option(help="Gate: exit 3 if a paro variant's PSNR vs dense is below this (dB).")
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(help="Gate: exit 3 if a paro variant loses more prompt fidelity than this (points of 100)."),
    ] = None,
    plan: Annotated[
        Path | None,
        typer.Option(
            help="A plan from `paro calibrate`, measured as the paro variant of its density and precision instead of "
            "calibrating one (the default --density / --precision)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Dense output against each recipe variant on a fixed prompt set: PSNR, SSIM and cosine
    similarity vs dense, prompt fidelity, and two baselines at equal density (no reordering, a
    static local window). Gates make it a CI check."""
    from ..bench import quality as qb
    from ..bench.heatmap import check_layer_and_head, write_heatmaps
    from ..media import check_video_path, write_video

    r = build_recipe(
        recipe,
        model=model,
        frames=frames,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        backend=backend,
        allocation=allocation,
    )
    given = load_plan(plan) if plan else None
    torch_backend = BACKENDS["torch"]
    default_pair = f"{given.qk}/{given.pv}" if given else f"{r.precision.qk}/{r.precision.pv}"
    pairs = parse_precisions(precision or [default_pair], torch_backend.qk_formats, torch_backend.pv_formats)
    densities = check_densities(density or [given.density if given else r.sparsity.density])
    if given:
        qb.check_given_plan(given, r)
        d, qk, pv = qb.plan_variant(given)
        if d not in densities or (qk, pv) not in pairs:
            raise ParoError(
                f"--plan {plan} is for density {d} {qk}/{pv}, which is not among the variants measured",
                f"add --density {d} --precision {qk}/{pv}, or leave both out",
            )
    if video is not None:
        check_video_path(video)
    if heatmaps is not None and heatmaps.exists() and not heatmaps.is_dir():
        raise ParoError(f"--heatmaps {heatmaps} is a file", "give a folder")
    if prompt_set not in PROMPT_SETS:
        raise ParoError(f"unknown --prompt-set {prompt_set!r}", "use " + ", ".join(PROMPT_SETS))
    texts = prompt or qb.demo_prompts(prompts, r, prompt_set)
    evaluation = "given prompts" if prompt else prompt_set
    if seed is None:
        seed = PROMPT_SETS[prompt_set][1]
    if max_drop is not None and not all(qb.is_caption(t) for t in texts):
        raise ParoError(
            "--max-drop needs prompt fidelity, which only the demo world's captions have", "drop --prompt or --max-drop"
        )
    seeds = [seed + i for i in range(len(texts))]
    call_kwargs = image_kwargs(image)
    ui = Output(as_json)
    loaded = as_loaded(load_model(r.model, r.sampling.dtype), call_kwargs)
    if heatmaps is not None:  # before any generation, as the plan checks below
        check_layer_and_head(
            layer,
            head,
            len(loaded.adapter.attention_layers(loaded.transformer)),
            loaded.adapter.num_heads(loaded.transformer),
        )
    if given:  # before any generation: a plan for another model or geometry fails now, not after the dense run
        check_plan(loaded, given, token_grid(loaded, r))
    with ui.progress() as bar:
        result, outputs = qb.run(loaded, r, densities, pairs, texts, seeds, baselines, bar, given, evaluation)
        if given:
            result["plan"] = {
                "path": str(plan),
                "variant": f"paro d={given.density} {given.qk}/{given.pv}",
                "calibration_prompts": list(given.prompts),
            }
        first = next(k for k in outputs["plans"])
        if heatmaps is not None:
            bar.start("heat maps", r.sampling.steps)
            result["heatmaps"] = write_heatmaps(
                loaded, r, outputs["plans"][first], texts[0], seeds[0], layer, head, heatmaps, bar.step
            )
    if video is not None:
        pair = torch.cat(
            [outputs["dense"][0], torch.full_like(outputs["dense"][0][:, :, :2], 255), outputs[first][0]], dim=2
        )
        write_video(pair.numpy(), video, r.sampling.fps)
        result["video"] = {"path": str(video), "left": "dense", "right": first}
    ui.table(
        f"quality vs dense on {result['device']}: {result['model']}, grid {'x'.join(map(str, result['grid']))}, "
        f"{result['steps']} steps, {len(texts)} {evaluation} prompts",
        ["variant", "density", "QK/PV", "PSNR (dB)", "paro's lead (dB)", "SSIM", "cosine", "fidelity", "fidelity drop"],
        [
            [
                row["variant"],
                row["density"],
                f"{row['qk']}/{row['pv']}",
                "-" if row["variant"] == "dense" else _with_error(row["psnr_db"], row["psnr_db_se"], "{:.2f}"),
                _with_error(row["paro_lead_db"], row["paro_lead_se"], "{:+.2f}") if "paro_lead_db" in row else "",
                f"{row['ssim']:.4f}",
                f"{row['cosine']:.5f}",
                "-" if row["fidelity"] is None else f"{100 * row['fidelity']:.1f}%",
                "-"
                if row["fidelity_drop"] is None or row["variant"] == "dense"
                else f"{100 * row['fidelity_drop']:+.1f}",
            ]
            for row in result["rows"]
        ],
    )
    if "heatmaps" in result:
        hm = result["heatmaps"]
        ui.print(
            f"heat maps (layer {hm['layer']}, head {hm['head']}, order {hm['order']}, kept blocks hold "
            f"{100 * hm['kept_mass']:.1f}% of the mass): {hm['before']}, {hm['after']}"
        )
    if video is not None:
        ui.print(f"side by side (dense | {first}): {video}")
    result["gates"] = failures = qb.gate_failures(result["rows"], min_psnr, max_drop)
    ui.json(result)
    if failures:
        raise GateFailed("; ".join(failures))
