"""CLI options shared by several commands, written once, and the recipe they build."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .media import read_image
from .recipe import Recipe, load_recipe

RecipeOpt = Annotated[
    str | None, typer.Option("--recipe", "-r", help="Recipe name (see `paro recipes`) or YAML path. Default: tiny.")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="'embedded', a hub id, a local diffusers folder (pipeline or transformer alone), or architecture:NAME "
        "(random weights, to time; geometry in latent units)."
    ),
]
FramesOpt = Annotated[int | None, typer.Option(help="Frames to generate (overrides geometry.frames).")]
HeightOpt = Annotated[int | None, typer.Option(help="Height in pixels (overrides geometry.height).")]
WidthOpt = Annotated[int | None, typer.Option(help="Width in pixels (overrides geometry.width).")]
StepsOpt = Annotated[int | None, typer.Option(help="Denoising steps (overrides sampling.steps).")]
GuidanceOpt = Annotated[
    float | None, typer.Option(help="Classifier-free guidance scale (overrides sampling.guidance).")
]
DensityOpt = Annotated[
    float | None, typer.Option(help="Target share of attention blocks kept, in (0, 1] (overrides sparsity.density).")
]
AllocationOpt = Annotated[
    str | None,
    typer.Option(
        help="How kept blocks are shared out: layer (each layer at the density) or global (one threshold over every "
        "planned layer and head, the same total) (overrides sparsity.allocation)."
    ),
]
BlockOpt = Annotated[
    int | None, typer.Option("--block-size", help="Attention block size in tokens (overrides sparsity.block_size).")
]
QkOpt = Annotated[
    str | None,
    typer.Option(
        "--qk",
        help="Q/K precision: fp32|bf16|fp16|int8|fp8|int4 (int4 simulated, no speed-up). With a plan, overrides the "
        "plan's.",
    ),
]
PvOpt = Annotated[
    str | None, typer.Option("--pv", help="P/V precision: fp32|bf16|fp16|fp8|int8. With a plan, overrides the plan's.")
]
BackendOpt = Annotated[
    str | None, typer.Option(help="Attention backend: auto|triton|torch (overrides recipe backend).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout (no tables, no progress).")]
PlanOpt = Annotated[str | None, typer.Option("--plan", "-p", help="Plan file from `paro calibrate`.")]
PromptOpt = Annotated[str | None, typer.Option(help="Prompt (default: the recipe's first calibration prompt).")]
SeedOpt = Annotated[int | None, typer.Option(help="Noise seed (default: the recipe's first seed).")]
ImageOpt = Annotated[
    Path | None,
    typer.Option(
        "--image",
        help="Input image of an image-to-video pipeline (WanImageToVideoPipeline): every call starts from it, "
        "calibration's too.",
    ),
]
GpusOpt = Annotated[
    int,
    typer.Option(
        "--gpus",
        help="GPUs of this host to run on, one process each, with diffusers' Ulysses context parallelism: each GPU "
        "runs a share of the tokens and, in attention, of the heads. Under torchrun, its processes (leave --gpus out).",
    ),
]


def build_recipe(recipe: str | None, **flags) -> Recipe:
    """Load a recipe with CLI flags as overrides; flag names map to recipe fields here only."""
    fields = {
        "model": "model",
        "frames": "geometry.frames",
        "height": "geometry.height",
        "width": "geometry.width",
        "steps": "sampling.steps",
        "guidance": "sampling.guidance",
        "density": "sparsity.density",
        "block_size": "sparsity.block_size",
        "allocation": "sparsity.allocation",
        "qk": "precision.qk",
        "pv": "precision.pv",
        "backend": "backend",
    }
    return load_recipe(recipe, {fields[k]: v for k, v in flags.items()})


def prompt_and_seed(recipe: Recipe, prompt: str | None, seed: int | None) -> tuple[str, int]:
    """The --prompt/--seed given, else the recipe's first calibration prompt and seed."""
    return (
        recipe.calibration.prompts[0] if prompt is None else prompt,
        recipe.calibration.seeds[0] if seed is None else seed,
    )


def image_kwargs(image: Path | None) -> dict | None:
    """The pipeline call arguments --image gives (the file read now: a bad one fails before any work)."""
    return {"image": read_image(image)} if image else None
