"""Wan 2.1 / 2.2 (WanTransformer3DModel): video-only self-attention in every block's attn1.

attn2 is cross-attention to text and stays with the stock path. Tokens are the patchified
latent grid, frame-major; RoPE is applied in the processor before `dispatch_attention_fn`, so
the q/k we intercept are post-RoPE, as calibration needs.
"""

from __future__ import annotations

import torch

from paro_kernels.layout import SequenceLayout

from .base import TransformerAdapter, check_pixel_multiple
from .prompt_encoder import HashPromptEncoder


class WanNormRopeProcessor:
    """attn1's stock WanAttnProcessor with norm_q/norm_k (RMSNorm over all heads) and RoPE as one
    kernel each for q and k (torch.ops.paro.norm_rope: one opaque call under torch.compile too);
    the rest, dispatch_attention_fn included, as diffusers has it. Cross-attention, image context
    and differentiated calls (the kernel has no backward) run the stock processor."""

    replaces = "WanAttnProcessor"  # the stock class this one mirrors (intercept.py installs it over that one only)

    def __init__(self, stock):
        from diffusers.models.transformers import transformer_wan

        import paro_kernels.ops  # noqa: F401  (registers torch.ops.paro.norm_rope)

        self.stock = stock
        self.transformer_module = (
            transformer_wan  # whose names the stock processor calls (read at call time: paro rebinds one)
        )

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if (
            encoder_hidden_states is not None
            or rotary_emb is None
            or attn.add_k_proj is not None
            or torch.is_grad_enabled()
        ):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = self.transformer_module._get_qkv_projections(attn, hidden_states, None)
        query, key = (
            torch.ops.paro.norm_rope(
                x, norm.weight, None, rotary_emb[0], rotary_emb[1], attn.heads, "rms", False, norm.eps, 0
            )
            for x, norm in ((query, attn.norm_q), (key, attn.norm_k))
        )
        out = self.transformer_module.dispatch_attention_fn(
            *(x.unflatten(2, (attn.heads, -1)) for x in (query, key, value)),
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self.stock._attention_backend,
            parallel_config=self.stock._parallel_config,
        )
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(query)))


class WanAdapter(TransformerAdapter):
    family = "wan"
    transformer_class = "WanTransformer3DModel"
    norm_rope_processor = WanNormRopeProcessor
    timestep_position = 1

    @property
    def call_site(self):
        """(module, name) through which the processors call attention (see intercept.py)."""
        from diffusers.models.transformers import transformer_wan

        return transformer_wan, "dispatch_attention_fn"

    def attention_layers(self, transformer: torch.nn.Module) -> list[str]:
        """Processor keys of the self-attention layers, in layer order."""
        return [f"blocks.{i}.attn1.processor" for i in range(len(transformer.blocks))]

    def token_grid_of_input(self, transformer: torch.nn.Module, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(F', H', W') for an input of shape (B, C, F, H, W)."""
        p_t, p_h, p_w = transformer.config.patch_size
        return (shape[2] // p_t, shape[3] // p_h, shape[4] // p_w)

    def sequence_layout(self, args: tuple, kwargs: dict) -> SequenceLayout:
        """Text reaches Wan only through cross-attention: self-attention is video alone."""
        return SequenceLayout(text_len=0)

    def pipeline_call_kwargs(self, sampling, geometry) -> dict:
        kwargs = super().pipeline_call_kwargs(sampling, geometry)
        if sampling.guidance_2 is not None:
            kwargs["guidance_scale_2"] = sampling.guidance_2
        return kwargs

    def pipeline_latent_shape(self, pipeline, geometry) -> tuple[int, ...]:
        """Latent (B, C, F, H, W) a Wan pipeline samples for a pixel geometry, with its rules:
        height and width multiples of 16 (else it refuses), frames rounded down to 4k + 1."""
        t, s = pipeline.vae_scale_factor_temporal, pipeline.vae_scale_factor_spatial
        check_pixel_multiple(geometry, "Wan")
        frames = geometry.frames if geometry.frames % t == 1 else geometry.frames // t * t + 1
        channels = pipeline.transformer.config.in_channels
        return (1, channels, (frames - 1) // t + 1, geometry.height // s, geometry.width // s)

    def divisors(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        """What the input's (F, H, W) must be multiples of."""
        return tuple(transformer.config.patch_size)

    def rope_axis_slices(self, transformer: torch.nn.Module) -> dict[str, slice]:
        """Each axis's RoPE dims in a head: Wan splits them t/h/w = D - 4*(D//6), 2*(D//6), 2*(D//6)."""
        head_dim = transformer.config.attention_head_dim
        hw = 2 * (head_dim // 6)
        t = head_dim - 2 * hw
        return {"F": slice(0, t), "H": slice(t, t + hw), "W": slice(t + hw, head_dim)}

    # paro's own sampling loop for a bare transformer (runner._builtin_sample)

    def prompt_encoder(self, transformer: torch.nn.Module) -> HashPromptEncoder:
        return HashPromptEncoder(transformer.config.text_dim)

    def forward_inputs(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        grid,
        guidance: float,
    ) -> dict:
        """Keyword arguments of one denoising forward on batch x at scheduler timestep t."""
        return {"hidden_states": x, "timestep": t.expand(x.shape[0]), "encoder_hidden_states": context}
