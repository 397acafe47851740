"""The adapter contract (TransformerAdapter) and what every family adapter shares: the config
fields diffusers' transformers all name alike, reading one forward call's inputs (keyword or
positional), and the token grid of a geometry."""

from __future__ import annotations

import abc
import types

import torch

from paro_kernels.layout import SequenceLayout

from ..errors import ModelError, RecipeError
from .prompt_encoder import HashPromptEncoder


def forward_input(args: tuple, kwargs: dict, name: str, position: int):
    """A forward call's argument `name`, passed by keyword or at `position`."""
    return kwargs[name] if name in kwargs else args[position]


def check_pixel_multiple(geometry, family: str, multiple: int = 16) -> None:
    """Pipelines refuse a height or width that is not a multiple of VAE factor x patch size."""
    for name in ("height", "width"):
        size = getattr(geometry, name)
        if size % multiple:
            raise RecipeError(
                f"geometry.{name} = {size}: {family} pipelines need multiples of {multiple}",
                f"use {size // multiple * multiple or multiple}",
            )


def stream_block_layers(transformer: torch.nn.Module) -> list[str]:
    """Processor keys of MMDiT-style models (Flux, HunyuanVideo): the double-stream blocks'
    joint attention, then the single-stream blocks'."""
    return [f"transformer_blocks.{i}.attn.processor" for i in range(len(transformer.transformer_blocks))] + [
        f"single_transformer_blocks.{i}.attn.processor" for i in range(len(transformer.single_transformer_blocks))
    ]


class TransformerAdapter(abc.ABC):
    """What paro needs to know about one diffusers transformer family: the contract every
    adapter (wan.py, cogvideox.py, hunyuanvideo.py, flux.py) fulfils.

    The abstract members each family must give; the rest have defaults for transformers whose
    input is a (B, C, F, H, W) latent and whose forward takes `hidden_states` first. A family
    whose tokens come otherwise (Flux's packed image) overrides `token_grid`,
    `pipeline_token_grid` and `input_token_grid` instead of `token_grid_of_input` and
    `pipeline_latent_shape`.
    """

    family: str  # the plan's family name
    transformer_class: str  # the diffusers class it adapts (the registry's key)
    timestep_position: int  # the forward's positional index of `timestep`
    num_train_timesteps = 1000
    classifier_free_guidance = True  # False: guidance-distilled (Flux), guidance goes in as an input
    # The self-attention processor with its QK norm and RoPE fused into one kernel
    # (kernels/paro_kernels/norm_rope.py), built from the stock one, same semantics; None where none exists.
    norm_rope_processor = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in ("family", "transformer_class", "timestep_position") if not hasattr(cls, name)]
        if missing:
            raise TypeError(f"adapter {cls.__name__} does not set {', '.join(missing)}")

    @property
    @abc.abstractmethod
    def call_site(self) -> tuple[types.ModuleType, str]:
        """(module, name) through which the processors call attention (see intercept.py)."""

    @abc.abstractmethod
    def attention_layers(self, transformer: torch.nn.Module) -> list[str]:
        """Processor keys of the self-attention layers a plan covers, in layer order."""

    @abc.abstractmethod
    def divisors(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        """What a bare transformer's input (frames, height, width) must be multiples of."""

    @abc.abstractmethod
    def sequence_layout(self, args: tuple, kwargs: dict) -> SequenceLayout:
        """Where a forward call's text tokens sit in its self-attention sequence."""

    @abc.abstractmethod
    def rope_axis_slices(self, transformer: torch.nn.Module) -> dict[str, slice]:
        """Each axis's (F, H, W) RoPE channels in a head (planted models plant along them)."""

    @abc.abstractmethod
    def prompt_encoder(self, transformer: torch.nn.Module) -> HashPromptEncoder:
        """The offline prompt encoder of paro's own loop, sized to the model's text input."""

    @abc.abstractmethod
    def forward_inputs(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        grid: tuple[int, int, int],
        guidance: float,
    ) -> dict:
        """Keyword arguments of one denoising forward of paro's own loop on batch x at timestep t."""

    def token_grid_of_input(self, transformer: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(F', H', W') for an input of shape (B, C, F, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} reads its token grid otherwise")

    def pipeline_latent_shape(self, pipeline, geometry) -> tuple[int, ...]:
        """Latent (B, C, F, H, W) a pipeline of this family samples for a pixel geometry."""
        raise NotImplementedError(f"{type(self).__name__} reads its pipeline's token grid otherwise")

    def num_heads(self, transformer: torch.nn.Module) -> int:
        return transformer.config.num_attention_heads

    def head_dim(self, transformer: torch.nn.Module) -> int:
        return transformer.config.attention_head_dim

    def token_grid(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        return self.token_grid_of_input(transformer, tuple(forward_input(args, kwargs, "hidden_states", 0).shape))

    def pipeline_token_grid(self, pipeline, geometry) -> tuple[int, int, int]:
        """The token grid a diffusers pipeline of this family makes of a pixel geometry."""
        return self.token_grid_of_input(pipeline.transformer, self.pipeline_latent_shape(pipeline, geometry))

    def input_token_grid(
        self, transformer: torch.nn.Module, frames: int, height: int, width: int
    ) -> tuple[int, int, int]:
        """The token grid of a bare transformer's input of that many frames and pixels."""
        return self.token_grid_of_input(transformer, (1, *self.input_shape(transformer, frames, height, width)))

    def pipeline_call_kwargs(self, sampling, geometry) -> dict:
        """Arguments of a video pipeline's call beyond prompts, steps, generators and callback."""
        return {
            "negative_prompt": sampling.negative_prompt,
            "height": geometry.height,
            "width": geometry.width,
            "num_frames": geometry.frames,
            "guidance_scale": sampling.guidance,
        }

    # Ulysses context parallelism (parallel.py): diffusers' engine splits the sequence where a plan says

    def context_parallel_plan(self, transformer: torch.nn.Module) -> dict:
        """The plan diffusers' context-parallel engine reads (`enable_parallelism(cp_plan=...)`):
        which inputs are split over the sequence, where the output is gathered. By default the one
        diffusers ships on the class (`_cp_plan`: Wan, Flux); refused (ModelError) where none exists."""
        plan = getattr(transformer, "_cp_plan", None)
        if plan is None:
            raise ModelError(
                f"diffusers has no context-parallel plan for {type(transformer).__name__} ({self.family})",
                "run this family on one GPU (--gpus 1)",
            )
        return plan

    def ulysses_processors(self, transformer: torch.nn.Module, rank: int, degree: int) -> dict:
        """Attention processors (by key) that replace the stock ones once the transformer is split
        over `degree` ranks (this one `rank`), where those would attend over this rank's shard
        alone or with a mask of the whole sequence; none by default (the stock processors pass
        diffusers' engine their parallel config)."""
        return {}

    def valid_text_lengths(self, args: tuple, kwargs: dict) -> list[int] | None:
        """Real text tokens per batch element where the forward pads its text and masks the
        padding out of self-attention (HunyuanVideo); None where nothing is padded."""
        return None

    # paro's own sampling loop for a bare transformer (runner._builtin_sample): flow matching on
    # (C, F, H, W) inputs unless the family says otherwise

    def input_shape(self, transformer: torch.nn.Module, frames: int, height: int, width: int) -> tuple[int, ...]:
        """One sample's input for an input of that many frames and pixels."""
        return (transformer.config.in_channels, frames, height, width)

    def scheduler(self, transformer: torch.nn.Module, sampling):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=3.0 if sampling.flow_shift is None else sampling.flow_shift)

    def as_video(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The loop's result as (B, C, F, H, W)."""
        return x

    def normalised_timestep(self, args: tuple, kwargs: dict) -> float:
        """Timestep in [0, 1] (1 = pure noise); where one comes per token (Wan 2.2 TI2V), the max."""
        return (
            float(torch.as_tensor(forward_input(args, kwargs, "timestep", self.timestep_position)).max())
            / self.num_train_timesteps
        )
