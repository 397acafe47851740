"""HunyuanVideo (HunyuanVideoTransformer3DModel): joint self-attention over [video, text].

Both kinds of block attend over the patchified video, frame-major, followed by the text tokens,
through `dispatch_attention_fn` after RoPE on the video part; double-stream blocks are layers
0..n-1 of a plan, single-stream ones n... The pipeline pads every prompt to the same length and
masks the padding out of attention's keys; paro runs each batch element on its video and its
real text tokens only (intercept.py), so a plan records the padded length. The model is
guidance-distilled: the guidance scale is an input, not a second (CFG) batch.
"""

from __future__ import annotations

import torch

from paro_kernels.layout import SequenceLayout

from ..errors import ModelError
from .base import TransformerAdapter, check_pixel_multiple, forward_input, stream_block_layers
from .prompt_encoder import HashPromptEncoder


class ShardedKeyMask:
    """A split HunyuanVideo's attention processor (`ulysses_processors`) with the model's key
    padding mask cut to this rank's shard.

    The plan splits the sequence at the first block, after the model has built its mask over the
    whole [video, text] sequence; each rank's blocks hold [video_r, text_r]. Diffusers' Ulysses
    all-to-all gathers a mask of the shard's length from every rank along with the keys, so each
    rank passes on its two chunks of the mask: the gathered mask then lines up with the gathered
    keys, and the padding stays masked out exactly."""

    def __init__(self, stock, rank: int, degree: int):
        self.stock = stock
        self.rank = rank
        self.degree = degree

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            video = hidden_states.shape[1] * self.degree
            attention_mask = torch.cat(
                [
                    part.chunk(self.degree, dim=-1)[self.rank]
                    for part in attention_mask.split([video, attention_mask.shape[-1] - video], dim=-1)
                ],
                dim=-1,
            )
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class HunyuanVideoAdapter(TransformerAdapter):
    family = "hunyuanvideo"
    transformer_class = "HunyuanVideoTransformer3DModel"
    timestep_position = 1
    classifier_free_guidance = False

    @property
    def call_site(self):
        from diffusers.models.transformers import transformer_hunyuan_video

        return transformer_hunyuan_video, "dispatch_attention_fn"

    def attention_layers(self, transformer: torch.nn.Module) -> list[str]:
        return stream_block_layers(transformer)

    def divisors(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        p = transformer.config.patch_size
        return (transformer.config.patch_size_t, p, p)

    def token_grid_of_input(self, transformer: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(F', H', W') for an input of shape (B, C, F, H, W)."""
        p_t, p, _ = self.divisors(transformer)
        return (shape[2] // p_t, shape[3] // p, shape[4] // p)

    def sequence_layout(self, args: tuple, kwargs: dict) -> SequenceLayout:
        return SequenceLayout(
            text_len=forward_input(args, kwargs, "encoder_hidden_states", 2).shape[1], text_first=False
        )

    def valid_text_lengths(self, args: tuple, kwargs: dict) -> list[int]:
        """The real tokens of each prompt: the model keeps the first ones of each row's mask
        (which pipelines pass in the model's dtype: counted as integers, as the model does)."""
        return forward_input(args, kwargs, "encoder_attention_mask", 3).sum(dim=1, dtype=torch.int).tolist()

    def context_parallel_plan(self, transformer: torch.nn.Module) -> dict:
        """Split at the first block, after the token refiner (which attends over the whole
        prompt) and after the model has built its attention mask over the whole sequence: the
        block's video and text along the sequence (each rank: [video_r, text_r] in every block;
        ShardedKeyMask cuts the mask to match), the RoPE tables (one row a video token) as the
        model makes them; the video gathered after the output projection. Image-to-video with
        token replacement treats the first frame's tokens apart by position: refused."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        if transformer.config.image_condition_type == "token_replace":
            raise ModelError(
                "HunyuanVideo with token replacement (image-to-video) treats the first frame's tokens apart by "
                "position, which a sequence split over GPUs moves",
                "run it on one GPU (--gpus 1)",
            )
        tokens = ContextParallelInput(split_dim=1, expected_dims=3)
        rows = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
        first = "transformer_blocks.0" if transformer.config.num_layers else "single_transformer_blocks.0"
        return {
            "rope": {0: rows, 1: rows},
            first: {"hidden_states": tokens, "encoder_hidden_states": tokens},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }

    def ulysses_processors(self, transformer: torch.nn.Module, rank: int, degree: int) -> dict:
        stock = transformer.attn_processors
        return {key: ShardedKeyMask(stock[key], rank, degree) for key in self.attention_layers(transformer)}

    def pipeline_latent_shape(self, pipeline, geometry) -> tuple[int, ...]:
        """Latent (B, C, F, H, W) a HunyuanVideo pipeline samples: height and width multiples of
        16, frames rounded down to 4k + 1."""
        t, s = pipeline.vae_scale_factor_temporal, pipeline.vae_scale_factor_spatial
        check_pixel_multiple(geometry, "HunyuanVideo")
        return (
            1,
            pipeline.transformer.config.in_channels,
            (geometry.frames - 1) // t + 1,
            geometry.height // s,
            geometry.width // s,
        )

    def rope_axis_slices(self, transformer: torch.nn.Module) -> dict[str, slice]:
        """Each axis's RoPE dims in a head: (t, h, w) = rope_axes_dim."""
        t, h, w = transformer.config.rope_axes_dim
        return {"F": slice(0, t), "H": slice(t, t + h), "W": slice(t + h, t + h + w)}

    # paro's own sampling loop for a bare transformer (runner._builtin_sample)

    def prompt_encoder(self, transformer: torch.nn.Module) -> HashPromptEncoder:
        return HashPromptEncoder(transformer.config.text_embed_dim)

    def forward_inputs(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        grid,
        guidance: float,
    ) -> dict:
        """The prompt encoder zero-pads: its real tokens are the non-zero rows (at least one, as
        the pipeline keeps one for the empty prompt). The pooled embedding: as for Flux, the mean
        of the real token embeddings, cut or zero-padded to pooled_projection_dim."""
        batch, pooled_dim = x.shape[0], transformer.config.pooled_projection_dim
        mask = context.abs().sum(dim=-1) > 0
        mask[:, 0] = True
        pooled = (context * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        pooled = torch.nn.functional.pad(pooled, (0, max(0, pooled_dim - pooled.shape[-1])))[:, :pooled_dim]
        embeds_guidance = transformer.config.guidance_embeds
        return {
            "hidden_states": x,
            "timestep": t.expand(batch),
            "encoder_hidden_states": context,
            "encoder_attention_mask": mask.to(torch.int64),
            "pooled_projections": pooled,
            "guidance": torch.full((batch,), guidance * 1000.0, device=x.device) if embeds_guidance else None,
        }
