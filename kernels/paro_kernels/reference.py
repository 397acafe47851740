"""Plain-torch reference of PAROAttention: the semantics every paro kernel must match.

One call computes, for each head h:
  1. gather the visual tokens of q, k, v into the head's order perm[h] (text stays in front);
  2. round Q and K to the QK format, one scale per block of `block` rows (Q: per block of at
     most quant.QUERY_SCALE_ROWS rows; text and visual segments blocked separately); for
     scaled formats K first loses its channel shift
     (quant.channel_shift, a sampled mean over tokens), which leaves softmax unchanged (it
     shifts every score of a row by the same amount);
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

Written for clarity and bounded memory, not speed: query rows go in chunks so that no more than
`max_chunk_elems` scores exist at once. In float64 (the default) it is the test oracle; the CPU
generation path runs the same function in float32.
"""

from __future__ import annotations

import torch

from .formats import is_scaled
from .layout import SequenceLayout, block_mask_rows, chunk_rows, gather_tokens, to_paro_order
from .orders import inverse_permutation
from .quant import QUERY_SCALE_ROWS, channel_shift, fake_quantize, quantize_probabilities


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    v_shift: torch.Tensor,
    allowed: torch.Tensor | None,
    scale: float,
    pv: str,
) -> torch.Tensor:
    """softmax(q k^T * scale) (v + v_shift) over `allowed` (H, rows, S) keys, with P rounded to
    `pv`; v is V less its shift. A row with no key outputs 0."""
    s = (q @ k.transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
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
    qt, qv = to_paro_order(q.to(compute_dtype), layout, perm)
    kt, kv = to_paro_order(k.to(compute_dtype), layout, perm)
    vt, vv = to_paro_order(v.to(compute_dtype), layout, perm)

    if is_scaled(qk):
        k_shift = channel_shift(k, compute_dtype).unsqueeze(2)
        kt, kv = kt - k_shift, kv - k_shift
    v_shift = channel_shift(v, compute_dtype).unsqueeze(2) if is_scaled(pv) else torch.zeros_like(vv[:, :, :1])
    qt, qv = (fake_quantize(x, qk, min(block, QUERY_SCALE_ROWS)) for x in (qt, qv))
    kt, kv = (fake_quantize(x, qk, block) for x in (kt, kv))
    keys = torch.cat([kt, kv], dim=2)
    values = torch.cat([fake_quantize(x - v_shift, pv, block) for x in (vt, vv)], dim=2)

    text_out = _attend(qt, keys, values, v_shift, None, scale, pv)
    rows = chunk_rows(max_chunk_elems, bsz, heads, seq, block)
    visual_out = []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        allowed = None
        if kept is not None:
            visual_cols = block_mask_rows(kept.to(q.device), block, n, start // block, stop - start)
            text_cols = visual_cols.new_ones(heads, stop - start, layout.text_len)
            allowed = torch.cat([text_cols, visual_cols], dim=2)
        visual_out.append(_attend(qv[:, :, start:stop], keys, values, v_shift, allowed, scale, pv))
    visual = torch.cat(visual_out, dim=2)
    if perm is not None:
        visual = gather_tokens(visual, inverse_permutation(perm))
    return layout.join(text_out, visual, dim=2).transpose(1, 2).to(q.dtype)
