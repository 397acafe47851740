"""Sampling: paro's own loop for bare transformers (the family adapter gives its scheduler and
forward inputs), or the diffusers pipeline.

Attention is whatever is installed on the transformer when `sample` runs (stock, a calibration
profiler or a plan): the loop itself knows nothing of paro.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .errors import ModelError, RecipeError
from .models.loaded import LoadedModel, token_grid
from .recipe import Recipe

StepCallback = Callable[[int], None]


def pixels_to_video(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


@torch.no_grad()
def _builtin_sample(
    loaded: LoadedModel, recipe: Recipe, prompts: list[str], seeds: list[int], on_step: StepCallback | None
) -> torch.Tensor:
    tr, s, g, adapter = loaded.transformer, recipe.sampling, recipe.geometry, loaded.adapter
    grid = token_grid(loaded, recipe)
    shape = adapter.input_shape(tr, g.frames, g.height, g.width)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]).to(
        loaded.device
    )
    cond = loaded.prompt_encoder(prompts)
    uncond = loaded.prompt_encoder([s.negative_prompt] * len(prompts))
    guided = adapter.classifier_free_guidance and s.guidance > 1.0
    context = (torch.cat([uncond, cond]) if guided else cond).to(loaded.device, loaded.dtype)
    scheduler = adapter.scheduler(tr, s)  # every family's starts from unit-variance noise (init_noise_sigma 1)
    scheduler.set_timesteps(s.steps, device=loaded.device)
    for i, t in enumerate(scheduler.timesteps):
        x_in = torch.cat([x, x]) if guided else x
        tr = loaded.transformer_at(t)
        guidance = s.guidance if tr is loaded.transformer or s.guidance_2 is None else s.guidance_2
        v = tr(**adapter.forward_inputs(tr, x_in.to(loaded.dtype), t, context, grid, guidance), return_dict=False)[
            0
        ].float()
        if guided:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        if on_step:
            on_step(i)
    return x


def with_flow_shift(scheduler, shift: float):
    """`scheduler` with the recipe's flow shift where it has a fixed one (Wan's UniPC
    `flow_shift`, the `shift` of HunyuanVideo's and FLUX.1-schnell's flow matching); unchanged
    where it has none (CogVideoX's DDIM) or shifts by resolution itself (FLUX.1-dev's dynamic
    shifting)."""
    config = scheduler.config
    key = (
        "flow_shift"
        if "flow_shift" in config
        else "shift"
        if "shift" in config and not config.get("use_dynamic_shifting")
        else None
    )
    if key is None or config[key] == shift:
        return scheduler
    return type(scheduler).from_config(config, **{key: shift})


def pipeline_call_kwargs(loaded: LoadedModel, sampling, geometry) -> dict:
    """A pipeline call's arguments beyond prompts, steps, generators and callback: the family's
    from the recipe, its text length if set, then the user's own (loaded.call_kwargs)."""
    kwargs = loaded.adapter.pipeline_call_kwargs(sampling, geometry)
    if sampling.max_sequence_length is not None:
        kwargs["max_sequence_length"] = sampling.max_sequence_length
    return {**kwargs, **loaded.call_kwargs}


def _pipeline_sample(
    loaded: LoadedModel,
    recipe: Recipe,
    prompts: list[str],
    seeds: list[int],
    on_step: StepCallback | None,
    decode: bool,
):
    s, g = recipe.sampling, recipe.geometry

    def callback(pipe, i, t, kwargs):
        if on_step:
            on_step(i)
        return {}

    shipped = loaded.pipeline.scheduler
    if s.flow_shift is not None:
        loaded.pipeline.scheduler = with_flow_shift(shipped, s.flow_shift)
    try:
        out = loaded.pipeline(
            prompt=prompts,
            num_inference_steps=s.steps,
            generator=[torch.Generator(loaded.device).manual_seed(seed) for seed in seeds],
            output_type="np" if decode else "latent",
            callback_on_step_end=callback,
            **pipeline_call_kwargs(loaded, s, g),
        )
    finally:
        loaded.pipeline.scheduler = shipped  # the next run starts from the pipeline's own
    return out.frames if hasattr(out, "frames") else out.images[:, None]  # images: one frame


def sample(
    loaded: LoadedModel,
    recipe: Recipe,
    prompts: list[str],
    seeds: list[int],
    *,
    on_step: StepCallback | None = None,
    decode: bool = True,
):
    """Run the full schedule for each (prompt, seed) pair as one batch.

    Returns (B, F, H, W, 3) uint8 video when `decode`, else the final latents.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if recipe.sampling.guidance_2 is not None and loaded.transformer_2 is None:
        raise RecipeError(
            f"sampling.guidance_2 is for models with two experts (Wan 2.2 A14B), {loaded.model_id} has one transformer",
            "remove sampling.guidance_2",
        )
    if loaded.pipeline is not None:
        check_call_arguments(loaded)
        frames = _pipeline_sample(loaded, recipe, prompts, seeds, on_step, decode)
        return torch.from_numpy((frames * 255).round().astype("uint8")) if decode else frames
    if recipe.sampling.max_sequence_length is not None:
        raise RecipeError(
            "sampling.max_sequence_length sets a pipeline's text length; this bare transformer takes its text as given",
            "remove sampling.max_sequence_length",
        )
    if decode:
        check_decodable(loaded)
    x = _builtin_sample(loaded, recipe, prompts, seeds, on_step)
    return pixels_to_video(loaded.adapter.as_video(x, token_grid(loaded, recipe))) if decode else x


def check_call_arguments(loaded: LoadedModel) -> None:
    """Refuse, before any work, a pipeline call missing an argument the pipeline requires and the
    recipe does not give (an image-to-video pipeline's `image`)."""
    given = {"prompt", *loaded.call_kwargs}
    for name, parameter in inspect.signature(type(loaded.pipeline).__call__).parameters.items():
        required = parameter.default is parameter.empty and parameter.kind not in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        )
        if required and name not in ("self", *given):
            fix = (
                "pass --image PATH (Python API: pipeline_kwargs={'image': ...})"
                if name == "image"
                else f"pass pipeline_kwargs={{{name!r}: ...}}"
            )
            raise ModelError(f"{type(loaded.pipeline).__name__} needs {name!r} in every call", fix)


def decodable(loaded: LoadedModel) -> bool:
    """A pipeline decodes with its VAE; a bare transformer only when it works in RGB pixels."""
    return loaded.pipeline is not None or loaded.transformer.config.in_channels == 3


def check_decodable(loaded: LoadedModel) -> None:
    if not decodable(loaded):
        raise ModelError(
            f"{loaded.model_id} is a bare transformer with {loaded.transformer.config.in_channels} latent channels "
            "and no VAE",
            "generate with a full diffusers pipeline folder or hub id",
        )
