import math

import pytest
import torch

from paro_kernels.quant import (
    BALANCE_LIMIT,
    MIN_AMAX,
    SHIFT_SAMPLES,
    channel_balance,
    channel_shift,
    choose_scale,
    dequantize,
    fake_quantize,
    quantize,
    quantize_probabilities,
)


def _scales_by_loop(x, block, qmax):
    """Per (row-block) scale computed with explicit loops."""
    n = x.shape[-2]
    out = torch.empty(*x.shape[:-2], math.ceil(n / block), 1)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in x.shape[:-2]]).reshape(-1, x.dim() - 2).tolist():
        for i in range(out.shape[-2]):
            tile = x[(*idx, slice(i * block, (i + 1) * block))]
            out[(*idx, i, 0)] = max(tile.abs().max().item(), MIN_AMAX) / qmax
    return out


@pytest.mark.parametrize("fmt,qmax", [("int8", 127), ("int4", 7), ("fp8", 448)])
def test_block_scales_and_codes_bit_exact(fmt, qmax):
    x = torch.randn(2, 3, 37, 8) * torch.linspace(0.1, 5, 37)[:, None]
    scale = choose_scale(x, fmt, 16)
    assert scale.shape == (2, 3, 3, 1)
    torch.testing.assert_close(scale, _scales_by_loop(x, 16, qmax), rtol=0, atol=0)
    codes = quantize(x, scale, fmt, 16)
    full = scale.repeat_interleave(16, dim=-2)[..., :37, :]
    if fmt == "fp8":
        expect = (x / full).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert codes.dtype == torch.float8_e4m3fn
        assert torch.equal(codes.float(), expect.float())
    else:
        expect = torch.round(x / full).clamp(-qmax, qmax)
        assert codes.dtype == torch.int8
        assert torch.equal(codes.float(), expect)
        assert codes.abs().max() == qmax  # the block maximum maps to the top code
    back = dequantize(codes, scale, 16, torch.float32)
    assert torch.equal(back, fake_quantize(x, fmt, 16))


def test_per_channel_scale():
    x = torch.randn(1, 2, 50, 4)
    x[..., 1] *= 100
    scale = choose_scale(x, "fp8", None)
    assert scale.shape == (1, 2, 1, 4)
    torch.testing.assert_close(scale[..., 0, 1], x[..., 1].abs().amax(-1) / 448)


def test_zero_block_quantises_to_zero():
    x = torch.zeros(1, 1, 8, 4)
    assert torch.equal(fake_quantize(x, "int8", 4), x)


def test_int8_error_bound():
    x = torch.randn(4, 64, 16)
    err = (fake_quantize(x, "int8", 32) - x).abs()
    assert (err <= choose_scale(x, "int8", 32).repeat_interleave(32, dim=-2) / 2 + 1e-7).all()


def test_float_formats_are_casts():
    x = torch.randn(3, 5, 7)
    assert torch.equal(fake_quantize(x, "fp32", 4), x)
    assert torch.equal(fake_quantize(x, "bf16", 4), x.bfloat16().float())
    assert torch.equal(fake_quantize(x, "fp16", None), x.half().float())


def test_probability_rounding():
    p = torch.rand(100, dtype=torch.float64)
    assert torch.equal(quantize_probabilities(p, "int8"), torch.round(p * 127) / 127)
    assert torch.equal(quantize_probabilities(p, "fp8"), (p * 448).to(torch.float8_e4m3fn).double() / 448)
    assert torch.equal(quantize_probabilities(p, "fp32"), p)


@pytest.mark.parametrize("seq,stride", [(SHIFT_SAMPLES, 1), (SHIFT_SAMPLES + 1, 2), (1000, 4)])
def test_channel_shift_is_the_mean_of_a_strided_sample(seq, stride):
    x = torch.randn(2, seq, 3, 8, dtype=torch.float64) + torch.arange(8.0, dtype=torch.float64)
    shift = channel_shift(x, torch.float64)
    assert shift.shape == (2, 3, 8)
    picked = [t for t in range(seq) if t % stride == 0]
    assert len(picked) <= SHIFT_SAMPLES
    torch.testing.assert_close(shift, sum(x[:, t] for t in picked) / len(picked), rtol=1e-12, atol=1e-12)


def test_channel_balance_leaves_qk_unchanged_and_equalises_channels():
    """(q / a)(k a)^T = q k^T to float64 rounding, and over the sampled tokens (every second of
    300) each channel's amax is then the same in q and k - shift: the geometric mean of both."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 300, 3, 16, generator=g, dtype=torch.float64) for _ in range(2))
    q[..., :2] *= 4.0  # outlier channels in q
    k += 8.0 * torch.randn(3, 16, generator=g, dtype=torch.float64)  # channel means far above k's spread
    shift = channel_shift(k, torch.float64)
    a = channel_balance(q, k, shift, torch.float64)
    assert a.shape == (2, 3, 16) and a.dtype == torch.float64
    qb, kb = q / a[:, None], (k - shift[:, None]) * a[:, None]
    scores = torch.einsum("bshd,bthd->bhst", q, k - shift[:, None])
    torch.testing.assert_close(torch.einsum("bshd,bthd->bhst", qb, kb), scores, rtol=1e-12, atol=1e-12)
    q_amax, k_amax = (x[:, ::2].abs().amax(dim=1) for x in (q, k - shift[:, None]))
    torch.testing.assert_close(a, (q_amax / k_amax).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(qb[:, ::2].abs().amax(dim=1), (q_amax * k_amax).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(kb[:, ::2].abs().amax(dim=1), (q_amax * k_amax).sqrt(), rtol=1e-12, atol=0)


def test_channel_balance_of_zero_channels_is_finite_and_bounded():
    """A channel zero in q, in k less its shift, or in both gives a finite factor within
    [1 / BALANCE_LIMIT, BALANCE_LIMIT] (both amaxes are at least MIN_AMAX), and rounding q / a and
    (k - shift) a stays finite."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 64, 2, 8, generator=g) for _ in range(2))
    q[..., 0] = 0.0  # zero in q: a would be ~1e-3, clamped up
    k[..., 1] = 3.0  # constant in k: zero less its shift, a would be ~1e3, clamped down
    q[..., 2], k[..., 2] = 0.0, 0.0  # zero in both: amaxes equal, a = 1
    shift = channel_shift(k)
    a = channel_balance(q, k, shift)
    assert torch.isfinite(a).all() and a.dtype == torch.float32
    assert (a >= 1 / BALANCE_LIMIT).all() and (a <= BALANCE_LIMIT).all()
    assert torch.equal(a[..., 0], torch.full_like(a[..., 0], 1 / BALANCE_LIMIT))
    assert torch.equal(a[..., 1], torch.full_like(a[..., 1], BALANCE_LIMIT))
    assert torch.equal(a[..., 2], torch.ones_like(a[..., 2]))
    for x in (q / a[:, None], (k - shift[:, None]) * a[:, None]):
        assert torch.isfinite(fake_quantize(x.transpose(1, 2), "int8", 16)).all()
