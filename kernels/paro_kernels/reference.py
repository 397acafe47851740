"""Plain-torch reference of PAROAttention: the semantics every paro kernel must match.

One call computes, for each head h:
  1. gather the visual tokens of q, k, v into the head's order perm[h] (text stays in front);
  2. round Q and K to the QK format, one scale per block of `block` rows (Q: per block of at
     most quant.QUERY_SCALE_ROWS rows; text and visual segments blocked separately); for
     scaled formats K first loses its channel shift (quant.channel_shift, a sampled mean over
     tokens), which leaves softmax unchanged (it shifts every score of a row by the same
     amount), then Q and K are balanced channel by channel: Q / a and (K - shift) a
     (quant.channel_balance), which leaves Q K^T unchanged and moves part of the range of
     Q's outlier channels into K, so that they set their blocks' steps less;
  3. round V to the PV format, blocked as K (the method's per-block dynamic scale; FP8 is a
     floating format, so small channels beside an outlier channel keep their relative
     precision); for scaled formats V first loses its channel shift, added back to the
     output: each row of P / l sums to 1, so P (V - shift) / l + shift = P V / l, and the
     smaller V - shift rounds with a smaller absolute error;
  4. scores S = Q K^T * scale over the kept blocks only: visual row block i sees visual column
     block j iff kept[h, i, j]; text rows and text columns are always seen;
  5. softmax numerators P = exp(S - rowmax) in [0, 1]; the row sum l is taken before rounding;
     P is rounded to the PV format; O = (P V) / l;
  6. write visual rows back in arrival order (the inverse gather).

Written for clarity and bounded memory, not speed: every score is computed and the dropped ones
masked; query rows go in chunks so that no more than `max_chunk_elems` scores exist at once. In
float64 (the default) it is the test oracle. Steps 1-3 (`paro_inputs`) and the softmax of step 5
(`attend`) are shared with block_sparse.py, the CPU path, which computes the kept tiles only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .formats import is_scaled
from .layout import SequenceLayout, block_mask_rows, chunk_rows, gather_tokens, to_paro_order
from .orders import inverse_permutation
from .quant import QUERY_SCALE_ROWS, channel_balance, channel_shift, fake_quantize, quantize_probabilities


class ParoInputs(NamedTuple):
    """What attention multiplies (steps 1-3): Q, K, V in paro order, each as its text and visual
    parts (B, H, len, D) in the compute dtype, rounded to their formats; for scaled QK formats Q
    and K balanced and K less its shift; V less its shift, and that shift (B, H, 1, D), zeros
    for unscaled PV formats."""

    q_text: torch.Tensor
    q_visual: torch.Tensor
    k_text: torch.Tensor
    k_visual: torch.Tensor
    v_text: torch.Tensor
    v_visual: torch.Tensor
    v_shift: torch.Tensor


def paro_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    perm: torch.Tensor | None,
    block: int,
    layout: SequenceLayout,
    qk: str,
    pv: str,
    compute_dtype: torch.dtype,
) -> ParoInputs:
    """Steps 1-3 of the module docstring on diffusers' (B, S, H, D) q, k, v."""
    qt, qv = to_paro_order(q.to(compute_dtype), layout, perm)
    kt, kv = to_paro_order(k.to(compute_dtype), layout, perm)
    vt, vv = to_paro_order(v.to(compute_dtype), layout, perm)

    if is_scaled(qk):
        k_shift = channel_shift(k, compute_dtype)
        balance = channel_balance(q, k, k_shift, compute_dtype).unsqueeze(2)
        qt, qv = qt / balance, qv / balance
        kt, kv = ((x - k_shift.unsqueeze(2)) * balance for x in (kt, kv))
    if is_scaled(pv):
        v_shift = channel_shift(v, compute_dtype).unsqueeze(2)
        vt, vv = vt - v_shift, vv - v_shift
    else:
        v_shift = torch.zeros_like(vv[:, :, :1])
    qt, qv = (fake_quantize(x, qk, min(block, QUERY_SCALE_ROWS)) for x in (qt, qv))
    kt, kv = (fake_quantize(x, qk, block) for x in (kt, kv))
    vt, vv = (fake_quantize(x, pv, block) for x in (vt, vv))
    return ParoInputs(qt, qv, kt, kv, vt, vv, v_shift)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    v_shift: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
    pv: str,
) -> torch.Tensor:
    """softmax(q k^T * scale) (v + v_shift) over `allowed` (H, rows, S) keys (None: all), with P
    rounded to `pv` after its row max and row sum are taken; v is V less its shift. A row with no
    key outputs 0."""
    s = (q @ k.transpose(-1, -2)).mul_(scale)  # in place: the score matrix is the large one
    if allowed is not None:
        s.masked_fill_(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = s.sub_(m).exp_()
    denominator = p.sum(dim=-1, keepdim=True)
    o = quantize_probabilities(p, pv) @ v
    return torch.where(denominator > 0, o / denominator + v_shift, torch.zeros_like(o))


def paro_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    perm: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
    block: int = 64,
    layout: SequenceLayout = SequenceLayout(),
    qk: str = "fp32",
    pv: str = "fp32",
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float64,
    max_chunk_elems: int = 1 << 24,
) -> torch.Tensor:
    """Masked, reordered, quantised attention.

    q, k, v: (B, S, H, D) as diffusers passes them. perm: (H, N) visual order per head, None for
    arrival order. kept: (H, ceil(N/block), ceil(N/block)) bool, None for dense. Returns
    (B, S, H, D) in q's dtype.
    """
    bsz, seq, heads, dim = q.shape
    n = layout.visual_len(seq)
    scale = dim**-0.5 if scale is None else scale
    qt, qv, kt, kv, vt, vv, v_shift = paro_inputs(
        q, k, v, perm=perm, block=block, layout=layout, qk=qk, pv=pv, compute_dtype=compute_dtype
    )
    keys = torch.cat([kt, kv], dim=2)
    values = torch.cat([vt, vv], dim=2)

    text_out = attend(qt, keys, values, v_shift, None, scale, pv)
    rows = chunk_rows(max_chunk_elems, bsz, heads, seq, block)
    visual_out = []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        allowed = None
        if kept is not None:
            visual_cols = block_mask_rows(kept.to(q.device), block, n, start // block, stop - start)
            text_cols = visual_cols.new_ones(heads, stop - start, layout.text_len)
            allowed = torch.cat([text_cols, visual_cols], dim=2)
        visual_out.append(attend(qv[:, :, start:stop], keys, values, v_shift, allowed, scale, pv))
    visual = torch.cat(visual_out, dim=2)
    if perm is not None:
        visual = gather_tokens(visual, inverse_permutation(perm))
    return layout.join(text_out, visual, dim=2).transpose(1, 2).to(q.dtype)
