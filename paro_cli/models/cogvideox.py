"""CogVideoX 2B / 5B / 1.5 (CogVideoXTransformer3DModel): joint self-attention over [text, video].

Every block's attn1 attends over the text tokens (the pipeline pads prompts to
max_text_seq_length, 226) followed by the patchified video, frame-major. Its processor is
diffusers' legacy CogVideoXAttnProcessor2_0, which calls F.scaled_dot_product_attention itself
on (B, H, S, D) after QK-norm and, for 5B and 1.5, RoPE on the video part: the q/k intercepted
there are post-RoPE. The 5B/1.5 pipelines compute the rotary embedding and pass it in; paro's
own loop for a bare transformer does the same (`forward_inputs`).
"""

from __future__ import annotations

import torch

from paro_kernels.layout import SequenceLayout

from ..errors import ModelError
from .base import TransformerAdapter, check_pixel_multiple, forward_input
from .prompt_encoder import HashPromptEncoder


class CogVideoXNormRopeProcessor:
    """attn1's stock CogVideoXAttnProcessor2_0 with norm_q/norm_k (LayerNorm per head) and the
    video tokens' RoPE as one kernel each for q and k (torch.ops.paro.norm_rope: one opaque call
    under torch.compile too); the rest, F.scaled_dot_product_attention on (B, H, S, D) included,
    as diffusers has it. Masked or differentiated calls (the kernel has no backward), or another
    norm, run the stock processor."""

    replaces = (
        "CogVideoXAttnProcessor2_0"  # the stock class this one mirrors (intercept.py installs it over that one only)
    )

    def __init__(self, stock):
        from diffusers.models import attention_processor

        import paro_kernels.ops  # noqa: F401  (registers torch.ops.paro.norm_rope)

        self.stock = stock
        self.functional_site = (
            attention_processor  # whose F the stock processor calls (dynamo refuses the import in __call__)
        )

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        if (
            attention_mask is not None
            or not isinstance(attn.norm_q, torch.nn.LayerNorm)
            or attn.norm_q.weight is None
            or torch.is_grad_enabled()
        ):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        text = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        query, key = (
            torch.ops.paro.norm_rope(
                proj(hidden_states), norm.weight, norm.bias, cos, sin, attn.heads, "layer", True, norm.eps, text
            )
            for proj, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k))
        )
        value = attn.to_v(hidden_states)
        batch, seq_len, channels = query.shape
        out = self.functional_site.F.scaled_dot_product_attention(
            *(x.view(batch, seq_len, attn.heads, -1).transpose(1, 2) for x in (query, key, value)),
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
        )
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(batch, seq_len, channels)))
        return out[:, text:], out[:, :text]


class CogVideoXUlyssesProcessor:
    """attn1 of a CogVideoX transformer split by Ulysses context parallelism (`ulysses_processors`).

    The stock processor attends with F.scaled_dot_product_attention over what it is given: under
    a split sequence, this rank's shard alone. This one computes the same projections, QK norm
    and video RoPE on the shard [text_r, video_r], on (B, S, H, D), and attends through diffusers'
    Ulysses all-to-all: this rank's heads over every rank's tokens, in the order the all-to-all
    gathers them ([text_0, video_0, text_1, ...]; exact for dense attention, which no order
    changes, and intercept.py puts it in the layout's order for paro). The attention call goes
    through diffusers' attention_processor.F, the call site intercept.py rebinds."""

    def __init__(self, parallel_config):
        from diffusers.models import attention_processor
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention
        from diffusers.models.embeddings import apply_rotary_emb

        self.parallel_config = parallel_config
        # looked up here: dynamo refuses imports in __call__
        self.functional_site, self.all_to_all, self.rope = (
            attention_processor,
            _templated_context_parallel_attention,
            apply_rotary_emb,
        )

    def _attend(self, ctx, query, key, value, *unused, **unused_kwargs) -> torch.Tensor:
        """diffusers' forward_op: the gathered sequence's attention, (B, S, H, D) in and out."""
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        return self.functional_site.F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:  # CogVideoX's blocks pass none
            raise ModelError(
                "a masked CogVideoX attention call cannot be split over GPUs", "run it on one GPU (--gpus 1)"
            )
        text = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (proj(joint).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:  # this rank's video rows (the plan splits the RoPE tables too)
            query, key = (
                torch.cat([x[:, :text], self.rope(x[:, text:], image_rotary_emb, sequence_dim=1)], dim=1)
                for x in (query, key)
            )
        out = self.all_to_all(
            query, key, value, forward_op=self._attend, backward_op=None, _parallel_config=self.parallel_config
        )
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
        return out[:, text:], out[:, :text]


def _centred_crop(grid: tuple[int, int], base: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Corners of `grid` (h, w) scaled to fit inside `base` (h, w), aspect kept, centred: where
    CogVideoX 1.0 places a latent grid in the coordinates its RoPE was trained on."""
    (h, w), (bh, bw) = grid, base
    scale = min(bh / h, bw / w)
    rh, rw = round(h * scale), round(w * scale)
    top, left = round((bh - rh) / 2), round((bw - rw) / 2)
    return (top, left), (top + rh, left + rw)


class CogVideoXAdapter(TransformerAdapter):
    family = "cogvideox"
    transformer_class = "CogVideoXTransformer3DModel"
    norm_rope_processor = CogVideoXNormRopeProcessor
    timestep_position = 2

    @property
    def call_site(self):
        from diffusers.models import attention_processor

        return attention_processor, "F"

    def attention_layers(self, transformer: torch.nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}.attn1.processor" for i in range(len(transformer.transformer_blocks))]

    def divisors(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        p = transformer.config.patch_size
        return (transformer.config.patch_size_t or 1, p, p)

    def token_grid_of_input(self, transformer: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(F', H', W') for an input of shape (B, F, C, H, W)."""
        p_t, p, _ = self.divisors(transformer)
        return (shape[1] // p_t, shape[3] // p, shape[4] // p)

    def sequence_layout(self, args: tuple, kwargs: dict) -> SequenceLayout:
        return SequenceLayout(
            text_len=forward_input(args, kwargs, "encoder_hidden_states", 1).shape[1], text_first=True
        )

    def pipeline_latent_shape(self, pipeline, geometry) -> tuple[int, ...]:
        """Latent (B, F, C, H, W) a CogVideoX pipeline samples: height and width multiples of 16,
        frames rounded down to 4k + 1, latent frames padded to the temporal patch (1.5)."""
        t, s = pipeline.vae_scale_factor_temporal, pipeline.vae_scale_factor_spatial
        check_pixel_multiple(geometry, "CogVideoX")
        frames = (geometry.frames - 1) // t + 1
        p_t = pipeline.transformer.config.patch_size_t or 1
        frames += -frames % p_t
        return (1, frames, pipeline.transformer.config.in_channels, geometry.height // s, geometry.width // s)

    def context_parallel_plan(self, transformer: torch.nn.Module) -> dict:
        """Split after the patch embedding, which joins text and video and adds the 2B model's
        positional embedding over the whole grid: the first block's video and text inputs along the
        sequence (each rank: [text_r, video_r] in every block), the RoPE tables (passed in, one row
        a video token) along their rows; the video gathered after the output projection. The text
        leaves the last block unused."""
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        tokens = ContextParallelInput(split_dim=1, expected_dims=3)
        rows = ContextParallelInput(split_dim=0, expected_dims=2)
        return {
            "": {"image_rotary_emb": (rows, rows)},
            "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }

    def ulysses_processors(self, transformer: torch.nn.Module, rank: int, degree: int) -> dict:
        processor = CogVideoXUlyssesProcessor(transformer._parallel_config)
        return dict.fromkeys(self.attention_layers(transformer), processor)

    def rope_axis_slices(self, transformer: torch.nn.Module) -> dict[str, slice]:
        """Each axis's RoPE dims in a head: CogVideoX splits them t/h/w = D/4, 3D/8, 3D/8."""
        head_dim = transformer.config.attention_head_dim
        t, hw = head_dim // 4, head_dim // 8 * 3
        return {"F": slice(0, t), "H": slice(t, t + hw), "W": slice(t + hw, head_dim)}

    # paro's own sampling loop for a bare transformer (runner._builtin_sample)

    def prompt_encoder(self, transformer: torch.nn.Module) -> HashPromptEncoder:
        """Prompts padded to max_text_seq_length tokens, as the pipelines pad them."""
        return HashPromptEncoder(transformer.config.text_embed_dim, transformer.config.max_text_seq_length)

    def input_shape(self, transformer: torch.nn.Module, frames: int, height: int, width: int) -> tuple[int, ...]:
        return (frames, transformer.config.in_channels, height, width)

    def scheduler(self, transformer: torch.nn.Module, sampling):
        """DDIM as the CogVideoX pipelines ship it: v-prediction, trailing timesteps, betas
        rescaled to zero terminal SNR, no clipping of the predicted sample (diffusers' default
        clips it to [-1, 1], which latents exceed), and an SNR shift of 3 for 2B (no RoPE), 1
        for 5B and 1.5."""
        from diffusers import CogVideoXDDIMScheduler

        shift = 1.0 if transformer.config.use_rotary_positional_embeddings else 3.0
        return CogVideoXDDIMScheduler(
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            rescale_betas_zero_snr=True,
            clip_sample=False,
            snr_shift_scale=shift,
        )

    def rotary_embedding(
        self, transformer: torch.nn.Module, grid: tuple[int, int, int], device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE (cos, sin) of a token grid, placed as the 5B (centred crop) and 1.5 (slice of
        the trained size) pipelines place it; None for models without RoPE (2B)."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        c = transformer.config
        if not c.use_rotary_positional_embeddings:
            return None
        base = (c.sample_height // c.patch_size, c.sample_width // c.patch_size)
        if c.patch_size_t is None:
            return get_3d_rotary_pos_embed(
                c.attention_head_dim, _centred_crop(grid[1:], base), grid[1:], grid[0], device=device
            )
        return get_3d_rotary_pos_embed(
            c.attention_head_dim, None, grid[1:], grid[0], grid_type="slice", max_size=base, device=device
        )

    def as_video(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The loop's result (B, F, C, H, W) as (B, C, F, H, W)."""
        return x.transpose(1, 2)

    def forward_inputs(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        grid,
        guidance: float,
    ) -> dict:
        return {
            "hidden_states": x,
            "encoder_hidden_states": context,
            "timestep": t.expand(x.shape[0]),
            "image_rotary_emb": self.rotary_embedding(transformer, grid, x.device),
        }
