"""The fused QK norm + RoPE kernel against a float64 reference (under the CPU interpreter on
small shapes, on the GPU at full size), and the fused processors against diffusers' stock ones.

The interpreter runs fp16 (its float32 -> bf16 cast truncates; a GPU's rounds to nearest), the
GPU bf16."""

import pytest
import torch

from paro_kernels.norm_rope import norm_rope
from paro_kernels.triton_attention import INTERPRET

from conftest import rel_l2

interpreted = pytest.mark.skipif(not INTERPRET, reason="CPU interpreter tests (TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def reference(x, *, heads, norm, per_head, weight, bias, eps, cos, sin, rope_start=0):
    """float64, written from the formulas: the norm rounded to x's dtype (the stock norm's
    output), then out[2j] = x[2j] cos[2j] - x[2j+1] sin[2j], out[2j+1] = x[2j+1] cos[2j+1] + x[2j] sin[2j+1]."""
    b, s, c = x.shape
    y = x.double().view(b, s, heads, c // heads) if per_head else x.double()
    if norm == "layer":
        y = y - y.mean(-1, keepdim=True)
    y = y / (y.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    y = (y * weight.double() + (0 if bias is None else bias.double())).reshape(b, s, c)
    y = y.to(x.dtype).double().view(b, s, heads, -1)
    if cos is None:
        return y.view(b, s, c).to(x.dtype)
    cos, sin = (t.double().reshape(1, s - rope_start, 1, -1) for t in (cos, sin))
    ev, od = y[:, rope_start:, :, 0::2].clone(), y[:, rope_start:, :, 1::2].clone()
    y[:, rope_start:, :, 0::2] = ev * cos[..., 0::2] - od * sin[..., 0::2]
    y[:, rope_start:, :, 1::2] = od * cos[..., 1::2] + ev * sin[..., 1::2]
    return y.view(b, s, c).to(x.dtype)


def inputs(b, s, heads, dim, rope_tokens, seed=0, dtype=DTYPE):
    """Rows with an offset and outlier channels; cos/sin tables whose even and odd columns differ
    (so a swapped index shows), not unit-norm pairs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, heads * dim, generator=g) * 2 + 0.7
    x[..., :: max(2, dim // 4)] *= 6
    angle = torch.rand(rope_tokens, dim, generator=g) * 6.3
    return x.to(DEVICE, dtype), angle.cos().to(DEVICE), (angle.sin() * 1.3).to(DEVICE)


CASES = {  # name: (batch, tokens, heads, dim, norm, per_head, bias, text before RoPE)
    "wan: RMS over all heads": (2, 37, 3, 16, "rms", False, False, 0),
    "cogvideox: LayerNorm per head, text prefix": (2, 29, 5, 8, "layer", True, True, 7),
    "odd sizes: 24-dim heads, RMS per head": (1, 19, 2, 24, "rms", True, False, 3),
    "LayerNorm per head, 4 heads to a row of the tile, text prefix": (2, 21, 4, 8, "layer", True, True, 5),
}


def check(name, case, seed=0, cos_none=False):
    b, s, heads, dim, norm, per_head, has_bias, text = case
    x, cos, sin = inputs(b, s, heads, dim, s - text, seed)
    g = torch.Generator().manual_seed(seed + 1)
    width = dim if per_head else heads * dim
    weight = (torch.rand(width, generator=g) + 0.5).to(DEVICE, x.dtype)
    bias = torch.randn(width, generator=g).to(DEVICE, x.dtype) if has_bias else None
    kw = dict(
        heads=heads,
        norm=norm,
        per_head=per_head,
        weight=weight,
        bias=bias,
        eps=1e-6,
        cos=None if cos_none else cos,
        sin=None if cos_none else sin,
        rope_start=text,
    )
    out, want = norm_rope(x, **kw), reference(x, **kw)
    normed = reference(x, **{**kw, "cos": None, "sin": None}).double()
    # The kernel rounds where the reference does; fp32 sums against float64 ones move a rounded
    # norm output by at most a unit (eps of its pair's size), which RoPE then carries into both
    # outputs of the pair, plus the output's own rounding.
    pair = normed.unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, dim=-1)
    eps = torch.finfo(x.dtype).eps
    assert ((out.double() - want.double()).abs() <= eps * (want.double().abs() + 2 * pair) + 1e-6).all(), name
    assert (out != want).float().mean() < 1e-3, name
    if not cos_none:  # the rotation is there to see
        assert rel_l2(out, normed) > 0.1, name


@interpreted
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_float64_reference(name):
    check(name, CASES[name])


@interpreted
def test_without_rope_only_the_norm():
    check("no rope", CASES["cogvideox: LayerNorm per head, text prefix"], cos_none=True)


def test_bad_tables_are_refused():
    x, cos, sin = inputs(1, 8, 2, 8, 8)
    w = torch.ones(16, device=DEVICE, dtype=x.dtype)
    with pytest.raises(ValueError, match="tables"):
        norm_rope(x, heads=2, norm="rms", per_head=False, weight=w, bias=None, eps=1e-6, cos=cos[:5], sin=sin[:5])
    with pytest.raises(ValueError, match="norm"):
        norm_rope(x, heads=2, norm="batch", per_head=False, weight=w, bias=None, eps=1e-6, cos=cos, sin=sin)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(2, 32760, 12, 128, "rms", False, False, 0), (2, 17776, 48, 64, "layer", True, True, 226)]
)
def test_kernel_at_full_size(shape):
    """Wan2.1-1.3B's and CogVideoX-5B's q at 81 / 49 frames."""
    check(str(shape), shape)


# fused processors against diffusers' stock ones, in a small model: in float32 they agree to
# float rounding; in 16 bits, up to the stock path's extra roundings of intermediates


def planted_step(family, dtype, batch, monkeypatch):
    """A small planted model of `family`, one forward's inputs, and the list each fused-kernel
    call appends to."""
    import paro_kernels.norm_rope
    from paro_cli.models import adapter_for
    from paro_cli.models.planted import build_planted_cogvideox, build_planted_transformer

    model = (build_planted_transformer if family == "wan" else build_planted_cogvideox)().to(DEVICE, dtype)
    adapter = adapter_for(model)
    grid = (2, 4, 4)
    tr_input = torch.randn(
        batch,
        *adapter.input_shape(model, *[g * d for g, d in zip(grid, adapter.divisors(model))]),
        generator=torch.Generator().manual_seed(0),
    ).to(DEVICE, dtype)
    context = torch.randn(batch, 8, adapter.prompt_encoder(model).dim, generator=torch.Generator().manual_seed(1)).to(
        DEVICE, dtype
    )
    kwargs = adapter.forward_inputs(model, tr_input, torch.tensor(700.0, device=DEVICE), context, grid, 5.0)
    calls = []
    fused_kernel = paro_kernels.norm_rope.norm_rope
    monkeypatch.setattr(paro_kernels.norm_rope, "norm_rope", lambda *a, **k: calls.append(1) or fused_kernel(*a, **k))
    return model, adapter, kwargs, calls


@pytest.mark.parametrize("dtype", [torch.float32, DTYPE])
@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_fused_processor_equals_stock(family, dtype, monkeypatch):
    from paro_cli.intercept import AttentionInterceptor, StockAttention

    model, adapter, kwargs, calls = planted_step(family, dtype, 2, monkeypatch)
    with torch.no_grad():
        stock = model(**kwargs, return_dict=False)[0]
        with AttentionInterceptor(model, adapter, StockAttention(), fuse_norm_rope=True):
            fused = model(**kwargs, return_dict=False)[0]
        with torch.enable_grad(), AttentionInterceptor(model, adapter, StockAttention(), fuse_norm_rope=True):
            differentiated = model(**kwargs, return_dict=False)[0]  # autograd on: the stock processor runs
    assert len(calls) == 2 * 2  # q and k of both layers, once
    assert rel_l2(fused, stock) < (1e-5 if dtype == torch.float32 else 1e-2) and not torch.equal(
        fused, torch.zeros_like(fused)
    )
    assert torch.equal(differentiated, stock)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_fused_processor_under_compile(family, monkeypatch):
    """torch.compile(fullgraph=True) traces the fused processor with the kernel as one opaque
    op (its fake gives the output's shape; AOT tracing runs it): no graph break, the kernel runs
    in the compiled step, the output is the eager fused one."""
    from paro_cli.intercept import AttentionInterceptor, StockAttention

    model, adapter, kwargs, calls = planted_step(family, DTYPE, 1, monkeypatch)
    with torch.no_grad(), AttentionInterceptor(model, adapter, StockAttention(), fuse_norm_rope=True):
        eager = model(**kwargs, return_dict=False)[0]
        del calls[:]
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        compiled = model(**kwargs, return_dict=False)[0]
    assert len(calls) == 2 * 2
    assert torch.equal(compiled, eager)


def test_fused_processor_never_replaces_a_custom_one():
    from paro_cli.intercept import AttentionInterceptor, StockAttention
    from paro_cli.models import adapter_for
    from paro_cli.models.planted import build_planted_transformer

    model = build_planted_transformer()
    custom = type("MyProcessor", (type(model.blocks[0].attn1.processor),), {})()
    model.set_attn_processor(custom)
    with AttentionInterceptor(model, adapter_for(model), StockAttention(), fuse_norm_rope=True):
        assert type(model.blocks[0].attn1.processor.stock) is type(custom)
