"""Wan 2.1 / 2.2 (WanTransformer3DModel): video-only self-attention in every block's attn1.

attn2 is cross-attention to text and stays with the stock path. Tokens are the patchified
latent grid, frame-major; RoPE is applied in the processor before `dispatch_attention_fn`, so
the q/k we intercept are post-RoPE, as calibration needs.
"""

from __future__ import annotations

import torch

from kernels.layout import SequenceLayout

from ..errors import RecipeError


class WanAdapter:
    family = "wan"
    transformer_class = "WanTransformer3DModel"
    num_train_timesteps = 1000

    @property
    def call_site(self):
        """(module, name) through which the processors call attention (see intercept.py)."""
        from diffusers.models.transformers import transformer_wan

        return transformer_wan, "dispatch_attention_fn"

    def attention_layers(self, transformer: torch.nn.Module) -> list[str]:
        """Processor keys of the self-attention layers, in layer order."""
        return [f"blocks.{i}.attn1.processor" for i in range(len(transformer.blocks))]

    def num_heads(self, transformer: torch.nn.Module) -> int:
        return transformer.config.num_attention_heads

    def head_dim(self, transformer: torch.nn.Module) -> int:
        return transformer.config.attention_head_dim

    def token_grid_of_input(self, transformer: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(F', H', W') for an input of shape (B, C, F, H, W)."""
        p_t, p_h, p_w = transformer.config.patch_size
        return (shape[2] // p_t, shape[3] // p_h, shape[4] // p_w)

    def token_grid(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return self.token_grid_of_input(transformer, tuple(hidden_states.shape))

    def normalised_timestep(self, args: tuple, kwargs: dict) -> float:
        """Timestep in [0, 1] (1 = pure noise); Wan 2.2 TI2V passes one per token: take the max."""
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        return float(torch.as_tensor(timestep).max()) / self.num_train_timesteps

    def sequence_layout(self, args: tuple, kwargs: dict) -> SequenceLayout:
        """Text reaches Wan only through cross-attention: self-attention is video alone."""
        return SequenceLayout(text_len=0)

    def pipeline_latent_shape(self, pipeline, geometry) -> tuple[int, ...]:
        """Latent (B, C, F, H, W) a Wan pipeline samples for a pixel geometry, with its rules:
        height and width multiples of 16 (else it refuses), frames rounded down to 4k + 1."""
        t, s = pipeline.vae_scale_factor_temporal, pipeline.vae_scale_factor_spatial
        for name in ("height", "width"):
            size = getattr(geometry, name)
            if size % 16:
                raise RecipeError(f"geometry.{name} = {size}: Wan pipelines need multiples of 16", f"use {size // 16 * 16 or 16}")
        frames = geometry.frames if geometry.frames % t == 1 else geometry.frames // t * t + 1
        channels = pipeline.transformer.config.in_channels
        return (1, channels, (frames - 1) // t + 1, geometry.height // s, geometry.width // s)

    def divisors(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        """What the input's (F, H, W) must be multiples of."""
        return tuple(transformer.config.patch_size)
