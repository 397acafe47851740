"""Quantisation primitives shared by the reference and the kernels.

Small pure functions in the torchao manner: `choose_scale` -> `quantize` -> `dequantize`, the
granularity passed as a value (`block_rows`: one scale per block of that many token rows, or
`None` for one scale per channel over all tokens). `fake_quantize` chains the three and is what
the reference attention applies, so the reference sees exactly the values a kernel multiplies.

Formats (formats.py lists them) and what they stand for:

| name | stored as                | range used           | scale                      |
|------|--------------------------|----------------------|----------------------------|
| fp32 | unchanged                | -                    | none                       |
| bf16 | torch.bfloat16           | -                    | none (a cast)              |
| fp16 | torch.float16            | -                    | none (a cast)              |
| int8 | integers in [-127, 127]  | symmetric, no -128   | amax / 127 per granule     |
| int4 | integers in [-7, 7]      | simulated only: Hopper has no INT4 tensor cores |
| fp8  | torch.float8_e4m3fn      | [-448, 448]          | amax / 448 per granule     |

Shapes: x is (..., N, D) with tokens on dim -2. A block-row scale is (..., ceil(N / b), 1); a
per-channel scale is (..., 1, D). Scales are float32, as the kernels keep them.

Smoothing that precedes the 8-bit formats, exact in exact arithmetic, per (batch, head) and
channel, from a strided sample of tokens (SHIFT_SAMPLES):

| primitive         | applied to                                  | exact because                   |
|-------------------|---------------------------------------------|---------------------------------|
| `channel_shift`   | K (8-bit QK): K - shift; V (8-bit PV) alike | softmax ignores a shift shared  |
|                   |                                             | by all keys; rows of P / l sum  |
|                   |                                             | to 1, so P V / l shifts with V  |
| `channel_balance` | Q / a and (K - shift) a (8-bit QK)          | (Q / a)(K a)^T = Q K^T          |

The shift (a mean) takes the channel offsets out of the rounding. The balance (as SmoothQuant
migrates activation outliers into weights) equalises each channel's range in Q and in K: with
a = sqrt(amax|Q| / amax|K - shift|) both become sqrt(amax|Q| amax|K - shift|). A DiT's Q has a
few outlier channels whose amax sets the step of a whole block of rows; where K less its shift
is narrow in those channels, a 4x outlier of Q becomes 2x in both, and the steps shrink with it
(a channel loud in both stays so: it is loud in Q K^T itself). It costs a multiply per element
where Q and K are quantised, nothing per score. Both amaxes are at least MIN_AMAX, so a channel
that is zero in Q or K gives a finite factor, and the factors are clamped (BALANCE_LIMIT).
"""

from __future__ import annotations

import math

import torch

from .formats import QMAX, is_scaled

FLOAT_CASTS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Tokens `channel_shift` averages: a strided sample estimates channel offsets as well as all
# tokens do, at a fraction of a pass over K and V.
SHIFT_SAMPLES = 256

# A granule whose largest magnitude is below this quantises to zeros instead of dividing by 0.
MIN_AMAX = 1e-6

# `channel_balance`'s factors lie in [1 / BALANCE_LIMIT, BALANCE_LIMIT]. Balancing needs factors of
# a few units (0.5-2.9 on the tests' DiT-shaped inputs, where Q's outlier channels are 4x); 2**8
# balances range ratios up to 2**16. The bound is for a channel the sample saw as all zero in one
# operand: its amax is MIN_AMAX, and the factor, about 1e3 for a channel of unit range in the
# other, would scale that operand's channel at the tokens the sample missed enough to take over
# their blocks' scales.
BALANCE_LIMIT = 2.0**8

# Query rows that share one scale: a block's rows, but at most this many. Every kernel program
# (or Hopper consumer warpgroup) then quantises only query rows it owns.
QUERY_SCALE_ROWS = 64


def _sample(x: torch.Tensor) -> torch.Tensor:
    """Every ceil(S / SHIFT_SAMPLES)-th token of x (B, S, H, D), starting at token 0 (at most
    SHIFT_SAMPLES of them)."""
    return x[:, :: -(-x.shape[1] // SHIFT_SAMPLES)]


def channel_shift(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-channel mean of x (B, S, H, D) over the sampled tokens: (B, H, D) in `dtype`."""
    return _sample(x).mean(dim=1, dtype=dtype)


def channel_balance(
    q: torch.Tensor, k: torch.Tensor, k_shift: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Factors a (B, H, D) in `dtype` by which 8-bit QK divides q and multiplies k - k_shift:
    sqrt(amax|q| / amax|k - k_shift|) per channel over the sampled tokens (those channel_shift
    averages), each amax at least MIN_AMAX, a within [1 / BALANCE_LIMIT, BALANCE_LIMIT].
    q, k: (B, S, H, D); k_shift: (B, H, D), channel_shift(k)."""
    q_amax = _sample(q).abs().amax(dim=1).to(dtype)
    k_amax = (_sample(k).to(dtype) - k_shift.to(dtype)[:, None]).abs().amax(dim=1)
    ratio = q_amax.clamp_min(MIN_AMAX) / k_amax.clamp_min(MIN_AMAX)
    return ratio.sqrt().clamp(1 / BALANCE_LIMIT, BALANCE_LIMIT)


def _blocks(x: torch.Tensor, block_rows: int) -> tuple[torch.Tensor, int]:
    """x (..., N, D) zero-padded to whole blocks and viewed as (..., nb, b, D)."""
    n = x.shape[-2]
    nb = math.ceil(n / block_rows)
    pad = nb * block_rows - n
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(*x.shape[:-2], nb, block_rows, x.shape[-1]), n


def choose_scale(x: torch.Tensor, fmt: str, block_rows: int | None) -> torch.Tensor:
    """float32 scale per granule so that amax maps to the format's largest value."""
    qmax = QMAX[fmt]
    ax = x.detach().abs().float()
    if block_rows is None:
        amax = ax.amax(dim=-2, keepdim=True)
    else:
        amax = _blocks(ax, block_rows)[0].amax(dim=(-2, -1)).unsqueeze(-1)
    return amax.clamp_min(MIN_AMAX) / qmax


def _expand(scale: torch.Tensor, n: int, block_rows: int | None) -> torch.Tensor:
    if block_rows is None:
        return scale
    return scale.repeat_interleave(block_rows, dim=-2)[..., :n, :]


def quantize(x: torch.Tensor, scale: torch.Tensor, fmt: str, block_rows: int | None) -> torch.Tensor:
    """Codes of x in `fmt`: int8 tensor for int8/int4, float8_e4m3fn for fp8."""
    y = x.float() / _expand(scale, x.shape[-2], block_rows)
    if fmt == "fp8":
        return y.clamp(-QMAX[fmt], QMAX[fmt]).to(torch.float8_e4m3fn)
    return y.round().clamp(-QMAX[fmt], QMAX[fmt]).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block_rows: int | None, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype) * _expand(scale, codes.shape[-2], block_rows).to(dtype)


def fake_quantize(x: torch.Tensor, fmt: str, block_rows: int | None) -> torch.Tensor:
    """x rounded to what `fmt` can hold at this granularity, returned in x's dtype."""
    if not is_scaled(fmt):
        cast = FLOAT_CASTS[fmt]
        return x if cast is None else x.to(cast).to(x.dtype)
    scale = choose_scale(x, fmt, block_rows)
    return dequantize(quantize(x, scale, fmt, block_rows), scale, block_rows, x.dtype)


def quantize_probabilities(p: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round softmax numerators p in [0, 1] as the PV product sees them, in p's dtype.

    p <= 1 holds by construction (exp of a score minus its row maximum), so a static scale
    suffices: fp8 holds 448 p (its whole range, keeping small p out of the subnormals), int8
    holds round(127 p).
    """
    if fmt == "fp8":
        return (p * QMAX["fp8"]).to(torch.float8_e4m3fn).to(p.dtype) / QMAX["fp8"]
    if fmt == "int8":
        return (p * QMAX["int8"]).round() / QMAX["int8"]
    cast = FLOAT_CASTS[fmt]
    return p if cast is None else p.to(cast).to(p.dtype)
