"""Full-size transformer architectures built from their published configs with random weights.

Speed does not depend on the weights, so `paro bench e2e --architecture` times real models'
denoising steps without downloading them. Each entry is a diffusers class, the config fields
that differ from that class's defaults (diffusers' defaults are Wan2.1-14B, CogVideoX-2B,
HunyuanVideo and FLUX.1-schnell), the shipped recipe whose geometry it runs at, the pipeline's VAE factors
(temporal, spatial) and the text tokens its pipeline feeds the transformer. Each runs at the
geometry of the shipped recipe of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ModelError
from ..recipe import Recipe
from . import adapter_for
from .loaded import LoadedModel


@dataclass(frozen=True)
class Architecture:
    class_name: str
    config: dict = field(default_factory=dict)
    vae_factors: tuple[int, int] = (4, 8)
    text_tokens: int = 512


ARCHITECTURES = {
    "wan2.1-t2v-1.3b": Architecture(
        "WanTransformer3DModel", {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
    ),
    "wan2.1-t2v-14b": Architecture("WanTransformer3DModel"),
    "cogvideox-2b": Architecture("CogVideoXTransformer3DModel", text_tokens=226),
    "cogvideox-5b": Architecture(
        "CogVideoXTransformer3DModel",
        {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True},
        text_tokens=226,
    ),
    "hunyuanvideo": Architecture("HunyuanVideoTransformer3DModel", text_tokens=256),
    "flux.1-dev": Architecture("FluxTransformer2DModel", {"guidance_embeds": True}, vae_factors=(1, 8)),
    "flux.1-schnell": Architecture(
        "FluxTransformer2DModel", vae_factors=(1, 8)
    ),  # FluxPipeline's default 512 text tokens
}


def check_architecture(name: str) -> None:
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {name!r}", "choose one of " + ", ".join(ARCHITECTURES))


def build_architecture(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    """The architecture `name` with random weights, made on `device` in `dtype`."""
    import diffusers

    check_architecture(name)
    arch = ARCHITECTURES[name]
    with torch.device(device), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialised in place: a 5B model in fp32 first would not fit twice
        try:
            transformer = getattr(diffusers, arch.class_name)(**arch.config).eval()
        finally:
            torch.set_default_dtype(default)
    adapter = adapter_for(transformer)
    return LoadedModel(
        f"architecture:{name}", transformer, adapter, device, dtype, None, adapter.prompt_encoder(transformer)
    )


def step_inputs(loaded: LoadedModel, name: str, recipe: Recipe) -> tuple[tuple[int, int, int], dict]:
    """(token grid, keyword arguments of one denoising forward) at the recipe's geometry, with
    random latents and text embeddings of the pipeline's sizes; a CFG batch of 2 where the family
    uses classifier-free guidance."""
    from types import SimpleNamespace

    arch, tr, adapter = ARCHITECTURES[name], loaded.transformer, loaded.adapter
    t_factor, s_factor = arch.vae_factors
    pipeline = SimpleNamespace(
        vae_scale_factor_temporal=t_factor, vae_scale_factor_spatial=s_factor, vae_scale_factor=s_factor, transformer=tr
    )
    grid = adapter.pipeline_token_grid(pipeline, recipe.geometry)
    latent = [g * d for g, d in zip(grid, adapter.divisors(tr))]
    batch = 2 if adapter.classifier_free_guidance else 1
    # the meta device (shapes only, checked before the weights are built) has no generator
    g = None if loaded.device.type == "meta" else torch.Generator(device=loaded.device).manual_seed(0)
    x = torch.randn(batch, *adapter.input_shape(tr, *latent), device=loaded.device, dtype=loaded.dtype, generator=g)
    context = torch.randn(
        batch, arch.text_tokens, loaded.prompt_encoder.dim, device=loaded.device, dtype=loaded.dtype, generator=g
    )
    t = torch.tensor(500.0, device=loaded.device)
    return grid, adapter.forward_inputs(tr, x, t, context, grid, recipe.sampling.guidance)
