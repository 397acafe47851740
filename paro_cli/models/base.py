"""What every family adapter shares: the config fields diffusers' video transformers all name
alike, and reading one forward call's inputs (keyword or positional)."""

from __future__ import annotations

import torch

from ..errors import RecipeError


def forward_input(args: tuple, kwargs: dict, name: str, position: int):
    """A forward call's argument `name`, passed by keyword or at `position`."""
    return kwargs[name] if name in kwargs else args[position]


def check_pixel_multiple(geometry, family: str, multiple: int = 16) -> None:
    """Pipelines refuse a height or width that is not a multiple of VAE factor x patch size."""
    for name in ("height", "width"):
        size = getattr(geometry, name)
        if size % multiple:
            raise RecipeError(f"geometry.{name} = {size}: {family} pipelines need multiples of {multiple}",
                              f"use {size // multiple * multiple or multiple}")


class VideoTransformerAdapter:
    num_train_timesteps = 1000

    def num_heads(self, transformer: torch.nn.Module) -> int:
        return transformer.config.num_attention_heads

    def head_dim(self, transformer: torch.nn.Module) -> int:
        return transformer.config.attention_head_dim

    def token_grid(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        return self.token_grid_of_input(transformer, tuple(forward_input(args, kwargs, "hidden_states", 0).shape))

    def normalised_timestep(self, args: tuple, kwargs: dict) -> float:
        """Timestep in [0, 1] (1 = pure noise); where one comes per token (Wan 2.2 TI2V), the max."""
        return float(torch.as_tensor(forward_input(args, kwargs, "timestep", self.timestep_position)).max()) / self.num_train_timesteps
