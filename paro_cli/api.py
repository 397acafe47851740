"""paro's Python API, for a diffusers pipeline (or a bare transformer) held in the user's own code.

    plan = calibrate(pipe, ["a cat surfing"], density=0.2, qk="int8", pv="fp8",
                     num_frames=81, height=480, width=832, num_inference_steps=50)
    plan.save("wan.plan.safetensors")
    with apply(pipe, load_plan("wan.plan.safetensors")):
        video = pipe(prompt=..., num_frames=81, height=480, width=832).frames[0]

The CLI is a layer over these same functions: it loads a model and a recipe (a model spec, a
YAML file and flags) and hands them here. Every refusal is a ParoError (PlanError, ModelError,
RecipeError, BackendError): a program catches it; nothing here exits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .calibration import CalibrationProgress
from .calibration import calibrate as calibrate_loaded
from .errors import ModelError, RecipeError
from .models.loaded import LoadedModel
from .models.loading import from_pipeline, from_transformer
from .plan import Plan, load_plan
from .plan_attention import AppliedPlan
from .recipe import Recipe, load_recipe, recipe_as_dict, recipe_from_fields

# Keyword arguments of `calibrate`, in diffusers' names, and the recipe fields they set.
SETTINGS = {
    "seeds": "calibration.seeds",
    "order_steps": "calibration.order_steps",
    "orders": "calibration.orders",
    "num_frames": "geometry.frames",
    "height": "geometry.height",
    "width": "geometry.width",
    "num_inference_steps": "sampling.steps",
    "guidance_scale": "sampling.guidance",
    "guidance_scale_2": "sampling.guidance_2",
    "negative_prompt": "sampling.negative_prompt",
    "flow_shift": "sampling.flow_shift",
    "max_sequence_length": "sampling.max_sequence_length",
    "density": "sparsity.density",
    "block_size": "sparsity.block_size",
    "slots": "sparsity.slots",
    "dense_first_steps": "sparsity.dense_first_steps",
    "allocation": "sparsity.allocation",
    "dense_layers": "sparsity.dense_layers",
    "qk": "precision.qk",
    "pv": "precision.pv",
}


def as_loaded(model: Any, pipeline_kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """What paro runs on: a diffusers pipeline, a bare diffusers transformer, or a model the CLI
    loaded (a LoadedModel). `pipeline_kwargs` go to every pipeline call paro makes (calibration's)."""
    from diffusers import DiffusionPipeline

    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, torch.nn.Module):
        loaded = from_transformer(model)
    elif isinstance(model, DiffusionPipeline):
        loaded = from_pipeline(model)
    else:
        raise ModelError(f"paro cannot run on a {type(model).__name__}", "pass a diffusers pipeline or its transformer")
    if pipeline_kwargs:
        loaded.add_call_kwargs(pipeline_kwargs)
    return loaded


def calibrate(
    model: Any,
    prompts: Sequence[str] | None = None,
    *,
    recipe: Recipe | str | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    progress: CalibrationProgress | None = None,
    **settings: Any,
) -> Plan:
    """Profile `model` on `prompts` and return its plan: a token order per attention head and
    block-sparse masks at the target density, for one geometry.

    `recipe` (a Recipe, a shipped recipe's name or a YAML path) gives the defaults; `settings`
    override them, in diffusers' names: seeds, num_frames, height, width, num_inference_steps,
    guidance_scale, guidance_scale_2, negative_prompt, flow_shift, max_sequence_length, density,
    block_size, slots, dense_first_steps, dense_layers, allocation, qk, pv, order_steps, orders; a setting of
    None keeps the recipe's. Without a recipe, prompts, height and width must be given (and
    num_frames for video: a plan serves the geometry it was made for), and the rest default to
    paro's recipe defaults (10 steps, guidance 5, density 0.5, block 64, bf16/bf16, every step
    profiled). `pipeline_kwargs` go to each pipeline call as they are (an image-to-video
    pipeline's `image`).
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise TypeError(
            f"calibrate() got an unexpected keyword argument {unknown[0]!r} (settings: {', '.join(SETTINGS)})"
        )
    loaded = as_loaded(model, pipeline_kwargs)
    if recipe is None:
        if not prompts:
            raise RecipeError(
                "calibrate needs prompts: the plan is calibrated on them", "pass a few prompts like yours"
            )
        missing = [name for name in ("height", "width") if settings.get(name) is None]
        if missing:
            raise RecipeError(
                f"calibrate needs {' and '.join(missing)}: a plan serves one geometry",
                "pass the sizes of the runs it is for",
            )
        if settings.get("num_frames") is None:
            if loaded.family != "flux":
                raise RecipeError(
                    "calibrate needs num_frames for a video model: a plan serves one geometry", "pass num_frames"
                )
            settings["num_frames"] = 1  # an image
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        settings["prompts"] = list(prompts)
    base = (
        recipe_as_dict(recipe) if isinstance(recipe, Recipe) else recipe_as_dict(load_recipe(recipe)) if recipe else {}
    )
    source = recipe.source if isinstance(recipe, Recipe) else str(recipe or "calibrate()")
    fields = {**SETTINGS, "prompts": "calibration.prompts"}
    seeds = settings.get("seeds")
    if isinstance(seeds, int):
        settings["seeds"] = [seeds]
    run = recipe_from_fields(base, {fields[name]: value for name, value in settings.items()}, source)
    return calibrate_loaded(loaded, run, progress)


def apply(
    model: Any,
    plan: Plan | str | Path,
    *,
    backend: str = "auto",
    qk: str | None = None,
    pv: str | None = None,
    grid: tuple[int, int, int] | None = None,
) -> AppliedPlan:
    """Run `model`'s self-attention through `plan` until the returned handle's `remove()` or the
    end of a `with` block, which restore the model exactly.

    Refused at once: a plan of another family or transformer config, a backend that cannot run on
    the model's device and dtype, a compiled transformer (apply first, then torch.compile). Each
    forward call is checked against the plan's token grid and text layout (a PlanError then).
    backend: auto (Triton kernels where they can serve, else torch: block-sparse plain torch with the
    reference's semantics), triton or torch; qk / pv override the plan's precision. `grid`, where
    the caller knows it, is checked now.
    """
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    return AppliedPlan(as_loaded(model), plan, backend, qk, pv, grid)
