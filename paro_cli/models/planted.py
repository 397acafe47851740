"""The planted model ("planted"): a small WanTransformer3DModel built from config, in pixel
space, whose attention has known answers for calibration to find.

Its weights are random except for planted attention: in every self-attention layer the query
and key projections are zeroed and their biases carry energy in the RoPE dimensions of chosen
axes only. A head then attends by RoPE distance along those axes alone: sharply along the
first letter of its planted order, broadly along the second, uniformly along the third. So its
attention is block-wise exactly in its planted order (that axis outermost, the ignored one
innermost), which calibration must find. At densities up to about 0.3 the planted order has
the strictly highest mass recall; at 0.5 several orders keep over 99% of the mass and the
incoherence tie-break decides among them, so the planted order is the known answer there only
up to that tie.
"""

from __future__ import annotations

import torch

from paro_kernels.orders import VIDEO_AXES

PLANTED_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=3,
    out_channels=3,
    text_dim=16,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    rope_max_seq_len=64,
)
PLANTED_ORDERS = (("HWF", "WFH"), ("FWH", "WHF"))  # [layer][head]
# Bias energy of a head's outermost axis (all its RoPE pairs: sharp, near-periodic locality) and
# of its middle axis (one low-frequency pair only: smooth locality over ~15 tokens). The
# innermost axis gets none, so attention is uniform along it.
AXIS_ENERGY = (1.0, 3.0)
MIDDLE_PAIR = 1
SHARPNESS = 3.0  # q/k norm weight: larger makes the planted heads attend more sharply


def plant_orders(
    attentions: list[torch.nn.Module],
    rope_slices: dict[str, slice],
    heads: int,
    head_dim: int,
    orders: tuple[tuple[str, ...], ...],
    pair_signs: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Make head h of attention module l attend block-wise in orders[l][h] (module docstring).

    rope_slices: each axis's RoPE dims in a head (the family adapter's `rope_axis_slices`).
    pair_signs: the bias of each rotated pair of dims; (1, -1) keeps a head's bias zero-mean,
    which a LayerNorm on q and k (CogVideoX) would otherwise partly subtract."""
    signs = torch.tensor(pair_signs)
    with torch.no_grad():
        for attn, layer_orders in zip(attentions, orders):
            bias = torch.zeros(heads, head_dim)
            for h, order in enumerate(layer_orders):
                assert sorted(order) == sorted(VIDEO_AXES)
                outer, middle = rope_slices[order[0]], rope_slices[order[1]]
                bias[h, outer] = AXIS_ENERGY[0] * signs.repeat((outer.stop - outer.start) // 2)
                pair = middle.start + 2 * MIDDLE_PAIR
                bias[h, pair : pair + 2] = AXIS_ENERGY[1] * signs
            for proj, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)):
                proj.weight.zero_()
                proj.bias.copy_(bias.flatten())
                norm.weight.fill_(SHARPNESS)


def _planted(class_name: str, config: dict, attentions, orders, seed: int, pair_signs=(1.0, 1.0)):
    """diffusers' `class_name` built from `config` (identical on every machine for a seed) with
    `orders` planted into the attention modules `attentions(transformer)` lists, by its family
    adapter's RoPE layout."""
    import diffusers

    from . import adapter_for

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = getattr(diffusers, class_name)(**config)
    c = transformer.config
    plant_orders(
        attentions(transformer),
        adapter_for(transformer).rope_axis_slices(transformer),
        c.num_attention_heads,
        c.attention_head_dim,
        orders,
        pair_signs,
    )
    return transformer.eval()


def _planted_wan(orders, seed: int):
    """A Wan transformer of PLANTED_CONFIG with `orders` planted into its blocks' self-attention."""
    return _planted(
        "WanTransformer3DModel", PLANTED_CONFIG, lambda t: [block.attn1 for block in t.blocks], orders, seed
    )


def build_planted_transformer(seed: int = 0):
    """The planted model ("planted"): a Wan transformer."""
    return _planted_wan(PLANTED_ORDERS, seed)


# The second expert of "planted-experts": other orders, so each expert's plan is told apart.
PLANTED_EXPERT_2_ORDERS = (("WHF", "FHW"), ("HFW", "FWH"))
PLANTED_BOUNDARY = 0.5


def build_planted_experts(seed: int = 0):
    """(high-noise expert, low-noise expert, boundary ratio): two planted Wan transformers that
    a sampler switches between at the boundary, as Wan 2.2 A14B's pipeline does."""
    return _planted_wan(PLANTED_ORDERS, seed), _planted_wan(PLANTED_EXPERT_2_ORDERS, seed + 1), PLANTED_BOUNDARY


PLANTED_COGVIDEOX_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    time_embed_dim=16,
    text_embed_dim=16,
    num_layers=2,
    sample_width=16,
    sample_height=16,
    sample_frames=13,
    patch_size=2,
    max_text_seq_length=8,
    use_rotary_positional_embeddings=True,
)


def build_planted_cogvideox(seed: int = 0):
    """A small CogVideoXTransformer3DModel (RoPE, text prefix of 8 tokens) with the same planted
    orders as the Wan model; its q/k LayerNorm asks for zero-mean biases."""
    return _planted(
        "CogVideoXTransformer3DModel",
        PLANTED_COGVIDEOX_CONFIG,
        lambda t: [block.attn1 for block in t.transformer_blocks],
        PLANTED_ORDERS,
        seed,
        pair_signs=(1.0, -1.0),
    )


def _stream_attentions(transformer) -> list:
    """The joint attention of each double-stream block, then of each single-stream block (Flux,
    HunyuanVideo), in plan layer order."""
    return [block.attn for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]


PLANTED_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=24,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=(8, 8, 8),  # each axis's RoPE frequencies as the planted Wan model's
)
# [layer][head]: layer 0 is the double-stream block, layer 1 the single-stream one. An image's
# orders are HW and WH; F (a constant position id over an image) is planted innermost.
PLANTED_FLUX_ORDERS = (("HWF", "WHF"), ("WHF", "HWF"))


def build_planted_flux(seed: int = 0):
    """A small FluxTransformer2DModel with planted image-image attention in both kinds of block."""
    return _planted("FluxTransformer2DModel", PLANTED_FLUX_CONFIG, _stream_attentions, PLANTED_FLUX_ORDERS, seed)


PLANTED_HUNYUAN_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=24,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    patch_size=2,
    patch_size_t=1,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_theta=10000.0,  # each axis's RoPE frequencies as the planted Wan model's
    rope_axes_dim=(8, 8, 8),
)


def build_planted_hunyuanvideo(seed: int = 0):
    """A small HunyuanVideoTransformer3DModel (text after the video, padded) with the Wan model's
    planted orders in its double- and single-stream blocks."""
    return _planted("HunyuanVideoTransformer3DModel", PLANTED_HUNYUAN_CONFIG, _stream_attentions, PLANTED_ORDERS, seed)


# One planted model per family, by the family's plan name.
PLANTED_BUILDERS = {
    "wan": build_planted_transformer,
    "cogvideox": build_planted_cogvideox,
    "flux": build_planted_flux,
    "hunyuanvideo": build_planted_hunyuanvideo,
}
