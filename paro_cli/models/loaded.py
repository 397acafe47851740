"""A model as paro runs it: its transformer(s), its family's adapter, where and in which dtype
it runs, and the pipeline around it if any; the model names a recipe may give besides folders
and hub ids; and the token grid a recipe's geometry makes on a model.

loading.py (from a recipe's model name), architectures.py (full-size, random weights) and the
Python API (a user's pipeline or transformer) all make LoadedModels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ModelError, RecipeError
from . import config_fingerprint
from .base import TransformerAdapter
from .prompt_encoder import HashPromptEncoder

if TYPE_CHECKING:
    from ..recipe import Recipe

EMBEDDED_MODEL = "embedded"  # the trained demo model shipped in paro_cli/demo/weights
PLANTED_MODEL = "planted"  # random weights with planted attention: calibration's known answers
PLANTED_EXPERTS_MODEL = "planted-experts"  # two planted Wan transformers switched at a boundary, as Wan 2.2
ARCHITECTURE_PREFIX = "architecture:"  # architecture:NAME, a full-size architecture with random weights
# Pipeline call arguments paro sets itself (runner.sample): from the recipe, or fixed because paro
# reads the output (return_dict, output_type) or makes the batch and its noise (latents, counts).
RECIPE_CALL_ARGS = (
    "prompt",
    "num_inference_steps",
    "generator",
    "output_type",
    "callback_on_step_end",
    "height",
    "width",
    "num_frames",
    "guidance_scale",
    "guidance_scale_2",
    "negative_prompt",
    "max_sequence_length",
    "return_dict",
    "latents",
    "num_videos_per_prompt",
    "num_images_per_prompt",
    "prompt_embeds",
    "negative_prompt_embeds",
)


@dataclass
class LoadedModel:
    model_id: str
    transformer: torch.nn.Module
    adapter: TransformerAdapter
    device: torch.device
    dtype: torch.dtype
    pipeline: Any = None
    prompt_encoder: HashPromptEncoder | None = None
    # Wan 2.2's low-noise expert: it runs the steps below boundary_ratio * the training
    # timesteps, `transformer` the ones above (as WanPipeline switches them)
    transformer_2: torch.nn.Module | None = None
    boundary_ratio: float | None = None
    # Arguments every pipeline call gets besides those of the recipe (an image-to-video
    # pipeline's `image`): the user's, through the Python API's pipeline_kwargs or --image.
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        """The transformers a plan has one component for, by their pipeline names."""
        if self.transformer_2 is None:
            return {"transformer": self.transformer}
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    def transformer_at(self, t) -> torch.nn.Module:
        """The transformer that runs the step at scheduler timestep t."""
        if self.transformer_2 is None or t >= self.boundary_ratio * self.adapter.num_train_timesteps:
            return self.transformer
        return self.transformer_2

    def add_call_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Give every pipeline call paro makes these arguments too; refused (before any work) for a
        bare transformer, for what paro sets from the recipe, and for what the pipeline does not take."""
        first = next(iter(kwargs))
        if self.pipeline is None:
            raise ModelError(
                f"a bare transformer takes no pipeline arguments (here {first!r})",
                "load the whole pipeline (a model_index.json folder or a hub id)",
            )
        clash = sorted(set(kwargs) & set(RECIPE_CALL_ARGS))
        if clash:
            raise RecipeError(
                f"a pipeline argument sets {clash[0]!r}, which paro sets from the recipe",
                "set it as a recipe field or calibrate's own argument",
            )
        parameters = inspect.signature(type(self.pipeline).__call__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            unknown = sorted(set(kwargs) - set(parameters))
            if unknown:
                name = type(self.pipeline).__name__
                raise ModelError(
                    f"{name} takes no {unknown[0]!r}",
                    "'image' is for image-to-video pipelines (WanImageToVideoPipeline)"
                    if unknown[0] == "image"
                    else f"see {name}.__call__ for what it takes",
                )
        self.call_kwargs = {**self.call_kwargs, **kwargs}

    def fingerprints(self) -> dict[str, str]:
        return {name: config_fingerprint(m) for name, m in self.components.items()}


def token_grid(loaded: LoadedModel, recipe: Recipe) -> tuple[int, int, int]:
    """The visual token grid this recipe's geometry gives on this model (checked for fit)."""
    g = recipe.geometry
    if loaded.pipeline is not None:
        return loaded.adapter.pipeline_token_grid(loaded.pipeline, g)
    divisors = loaded.adapter.divisors(loaded.transformer)
    for name, size, d in zip(("frames", "height", "width"), (g.frames, g.height, g.width), divisors):
        if size % d:
            raise RecipeError(
                f"geometry.{name} = {size} is not a multiple of the model's patch size {d}", f"use a multiple of {d}"
            )
    return loaded.adapter.input_token_grid(loaded.transformer, g.frames, g.height, g.width)
