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

from kernels.orders import VIDEO_AXES

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


def rope_axis_slices(head_dim: int) -> dict[str, slice]:
    """Wan splits each head's dims t/h/w = D - 4*(D//6), 2*(D//6), 2*(D//6)."""
    hw = 2 * (head_dim // 6)
    t = head_dim - 2 * hw
    return {"F": slice(0, t), "H": slice(t, t + hw), "W": slice(t + hw, head_dim)}


def plant_orders(transformer: torch.nn.Module, orders: tuple[tuple[str, ...], ...]) -> None:
    """Make head h of layer l attend block-wise in orders[l][h] (see module docstring)."""
    heads = transformer.config.num_attention_heads
    head_dim = transformer.config.attention_head_dim
    slices = rope_axis_slices(head_dim)
    with torch.no_grad():
        for block, layer_orders in zip(transformer.blocks, orders):
            attn = block.attn1
            bias = torch.zeros(heads, head_dim)
            for h, order in enumerate(layer_orders):
                assert sorted(order) == sorted(VIDEO_AXES)
                outer, middle = slices[order[0]], slices[order[1]]
                bias[h, outer] = AXIS_ENERGY[0]
                pair = middle.start + 2 * MIDDLE_PAIR
                bias[h, pair : pair + 2] = AXIS_ENERGY[1]
            for proj, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)):
                proj.weight.zero_()
                proj.bias.copy_(bias.flatten())
                norm.weight.fill_(SHARPNESS)


def build_planted_transformer(seed: int = 0):
    """The planted model, identical on every machine for a given seed."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**PLANTED_CONFIG)
    plant_orders(transformer, PLANTED_ORDERS)
    return transformer.eval()
