"""FLUX.1 dev / schnell (FluxTransformer2DModel): joint self-attention over [text, image].

Both kinds of block attend over the text tokens (the pipeline's max_sequence_length: 512 for
dev, 256 for schnell) followed by the packed image latents (2x2 patches, row-major), through
`dispatch_attention_fn` after RoPE on the whole joint sequence: the double-stream blocks
(`transformer_blocks`) and the single-stream ones (`single_transformer_blocks`) are layers
0..n-1 and n.. of a plan. An image is a token grid of one frame, so its orders are HW and WH.
FLUX.1 is guidance-distilled: the guidance scale is an input, not a second (CFG) batch.
"""

from __future__ import annotations

import torch

from paro_kernels.layout import SequenceLayout

from ..errors import ModelError, RecipeError
from .base import TransformerAdapter, check_pixel_multiple, forward_input, stream_block_layers
from .prompt_encoder import HashPromptEncoder


class FluxAdapter(TransformerAdapter):
    family = "flux"
    transformer_class = "FluxTransformer2DModel"
    timestep_position = 3
    num_train_timesteps = 1  # pipelines pass t / 1000 already
    classifier_free_guidance = False

    @property
    def call_site(self):
        from diffusers.models.transformers import transformer_flux

        return transformer_flux, "dispatch_attention_fn"

    def attention_layers(self, transformer: torch.nn.Module) -> list[str]:
        return stream_block_layers(transformer)

    def divisors(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        return (1, 2, 2)  # latents are packed in 2x2 patches

    def token_grid(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(1, rows, columns) from the image tokens' position ids (row in column 1, column in 2)."""
        ids = forward_input(args, kwargs, "img_ids", 4)
        rows, cols = (int(x) + 1 for x in ids.reshape(-1, 3)[:, 1:].amax(dim=0).tolist())
        tokens = forward_input(args, kwargs, "hidden_states", 0).shape[1]
        if rows * cols != tokens:
            raise ModelError(
                f"FLUX.1 call with {tokens} image tokens on a {rows}x{cols} grid (e.g. Kontext reference images)",
                "paro plans plain text-to-image FLUX.1 calls only",
            )
        return (1, rows, cols)

    def sequence_layout(self, args: tuple, kwargs: dict) -> SequenceLayout:
        return SequenceLayout(
            text_len=forward_input(args, kwargs, "encoder_hidden_states", 1).shape[1], text_first=True
        )

    def _check_image(self, frames: int) -> None:
        if frames != 1:
            raise RecipeError(f"geometry.frames = {frames}: FLUX.1 makes images", "set geometry.frames: 1")

    def pipeline_token_grid(self, pipeline, geometry) -> tuple[int, int, int]:
        """Pixels / (VAE factor 8 x packing 2); the pipeline would round other sizes down silently."""
        self._check_image(geometry.frames)
        check_pixel_multiple(geometry, "FLUX.1", 2 * pipeline.vae_scale_factor)
        return (
            1,
            geometry.height // (2 * pipeline.vae_scale_factor),
            geometry.width // (2 * pipeline.vae_scale_factor),
        )

    def pipeline_call_kwargs(self, sampling, geometry) -> dict:
        return {"height": geometry.height, "width": geometry.width, "guidance_scale": sampling.guidance}

    def rope_axis_slices(self, transformer: torch.nn.Module) -> dict[str, slice]:
        """Each position id's RoPE dims in a head: (index, row, column) = axes_dims_rope; the
        first id is constant over an image, so "F" carries no locality there."""
        a, b, c = transformer.config.axes_dims_rope
        return {"F": slice(0, a), "H": slice(a, a + b), "W": slice(a + b, a + b + c)}

    # paro's own sampling loop for a bare transformer (runner._builtin_sample): geometry height
    # and width are latent positions, packed 2x2 into tokens of in_channels values

    def input_token_grid(
        self, transformer: torch.nn.Module, frames: int, height: int, width: int
    ) -> tuple[int, int, int]:
        self._check_image(frames)
        return (1, height // 2, width // 2)

    def input_shape(self, transformer: torch.nn.Module, frames: int, height: int, width: int) -> tuple[int, ...]:
        return ((height // 2) * (width // 2), transformer.config.in_channels)

    def prompt_encoder(self, transformer: torch.nn.Module) -> HashPromptEncoder:
        return HashPromptEncoder(transformer.config.joint_attention_dim)

    def as_video(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Packed (B, rows * cols, 4 C) as (B, C, 1, 2 rows, 2 cols)."""
        b, (_, rows, cols) = x.shape[0], grid
        x = x.reshape(b, rows, cols, -1, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, x.shape[1], 1, 2 * rows, 2 * cols)

    def forward_inputs(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        grid,
        guidance: float,
    ) -> dict:
        """paro's offline prompt encoder has no pooled embedding: the mean of the prompt's token
        embeddings, cut or zero-padded to pooled_projection_dim, stands in for it."""
        batch, (_, rows, cols) = x.shape[0], grid
        pooled = torch.nn.functional.pad(
            context.mean(dim=1), (0, max(0, transformer.config.pooled_projection_dim - context.shape[-1]))
        )
        img_ids = torch.zeros(rows, cols, 3, device=x.device)
        img_ids[..., 1] = torch.arange(rows, device=x.device)[:, None]
        img_ids[..., 2] = torch.arange(cols, device=x.device)[None, :]
        embeds_guidance = transformer.config.guidance_embeds
        return {
            "hidden_states": x,
            "encoder_hidden_states": context,
            "pooled_projections": pooled[:, : transformer.config.pooled_projection_dim],
            "timestep": (t / 1000).expand(batch),
            "img_ids": img_ids.reshape(-1, 3),
            "txt_ids": torch.zeros(context.shape[1], 3, device=x.device),
            "guidance": torch.full((batch,), guidance, device=x.device) if embeds_guidance else None,
        }
