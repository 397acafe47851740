"""The fused tanh-GELU projections (paro_cli/models/fused_gelu.py): where they are installed, that
they compute the stock function, and that leaving restores the stock modules.

On CPU torch._addmm_activation applies the exact GELU, so the CPU tests run the fused path through
a stand-in with the CUDA op's semantics (the GEMM plus bias, then the tanh GELU): what they check
is the plumbing (which modules, the operand layout, the reshape). The GPU test checks the op."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU

from paro_cli.models import fused_gelu
from paro_cli.models.fused_gelu import FusedTanhGelu, fused_gelu_projections
from paro_cli.models.planted import PLANTED_BUILDERS, build_planted_transformer

from conftest import rel_l2


def feed_forward_input(model, rows=6, seed=0):
    ff = next(m for m in model.modules() if type(m).__name__ == "FeedForward")
    gelu = ff.net[0]
    x = torch.randn(2, rows, gelu.proj.in_features, generator=torch.Generator().manual_seed(seed))
    return ff, gelu, x


@pytest.mark.parametrize("family", sorted(PLANTED_BUILDERS))
def test_installed_on_every_tanh_gelu_projection_and_restored(family):
    model = PLANTED_BUILDERS[family]()
    stock = {name: m for name, m in model.named_modules() if type(m) is GELU}
    keys = list(model.state_dict())
    assert stock and all(m.approximate == "tanh" for m in stock.values())
    with fused_gelu_projections([model]):
        inside = dict(model.named_modules())
        assert all(type(inside[name]) is FusedTanhGelu and inside[name].proj is m.proj for name, m in stock.items())
        assert list(model.state_dict()) == keys  # the stand-in holds the stock Linear under its name
    assert all(dict(model.named_modules())[name] is m for name, m in stock.items())


def test_exact_gelu_projections_are_left_alone():
    model = torch.nn.Sequential(GELU(8, 16), GELU(8, 16, approximate="tanh"))
    with fused_gelu_projections([model]):
        assert type(model[0]) is GELU and type(model[1]) is FusedTanhGelu


def test_fused_path_equals_stock(monkeypatch):
    """Through a CPU stand-in for the CUDA op: the same output as the stock module, from one
    call per projection with a (rows, in) x (in, out) product."""
    calls = fused_on_cpu(monkeypatch)
    model = build_planted_transformer()
    ff, gelu, x = feed_forward_input(model)
    with torch.no_grad():
        stock = ff(x)
        with fused_gelu_projections([model]):
            fused = ff(x)
            with torch.enable_grad():
                differentiated = ff(x)  # autograd on: the stock path
    assert calls == [((12, gelu.proj.in_features), (gelu.proj.in_features, gelu.proj.out_features), True)]
    assert rel_l2(fused, stock) < 1e-6 and torch.equal(differentiated, stock)


def fused_on_cpu(monkeypatch):
    """Make CPU a fused device, with a stand-in for the CUDA op (the GEMM plus bias, then the
    tanh GELU); returns the list of its calls' operand shapes."""
    calls = []

    def addmm_gelu_tanh(bias, mat1, mat2, use_gelu):
        calls.append((tuple(mat1.shape), tuple(mat2.shape), use_gelu))
        return F.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")

    monkeypatch.setattr(fused_gelu, "FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(torch, "_addmm_activation", addmm_gelu_tanh)
    return calls


def test_fused_path_under_compile(monkeypatch):
    """torch.compile(fullgraph=True) traces the fused module's checks and op: no graph break."""
    calls = fused_on_cpu(monkeypatch)
    model = build_planted_transformer()
    ff, _, x = feed_forward_input(model)
    with torch.no_grad(), fused_gelu_projections([model]):
        eager = ff(x)
        compiled = torch.compile(ff, fullgraph=True, backend="aot_eager")(x)
    assert len(calls) == 2 and torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)


class TaggedTensor(torch.Tensor):
    """A tensor subclass standing in for a quantised weight's."""


def stock_variants(proj: torch.nn.Linear) -> dict:
    """Linears computing proj's function (or, without bias, what they compute) that the fused
    GEMM would get wrong or must not touch."""

    def clone(cls=torch.nn.Linear, bias=True):
        new = cls(proj.in_features, proj.out_features, bias=bias)
        new.load_state_dict(proj.state_dict(), strict=bias)
        return new

    lora = clone(type("LoraLinear", (torch.nn.Linear,), {}))  # a LoRA layer adds its term in its forward
    own_forward = clone()
    own_forward.forward = own_forward.forward  # how accelerate's and diffusers' hooks install themselves
    forward_hook = clone()
    forward_hook.register_forward_hook(lambda module, args, out: out)
    subclassed_weight = clone()
    subclassed_weight.weight = torch.nn.Parameter(proj.weight.detach().clone().as_subclass(TaggedTensor))
    return {
        "lora": lora,
        "own forward": own_forward,
        "forward hook": forward_hook,
        "tensor-subclass weight": subclassed_weight,
        "no bias": clone(bias=False),
    }


def test_stock_path_where_the_fused_gemm_would_differ(monkeypatch):
    """LoRA-wrapped, hooked, quantised (a tensor subclass), bias-free projections and autocast
    runs keep the stock module's own call."""
    calls = fused_on_cpu(monkeypatch)
    model = build_planted_transformer()
    ff, gelu, x = feed_forward_input(model)
    with torch.no_grad(), fused_gelu_projections([model]):
        stand_in, plain = ff.net[0], gelu.proj
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stand_in(x)
        for name, proj in stock_variants(plain).items():
            gelu.proj = stand_in.proj = proj
            assert torch.equal(stand_in(x), F.gelu(proj(x), approximate="tanh")), name
        assert calls == []
        gelu.proj = stand_in.proj = plain
        stand_in(x)  # and the plain Linear is fused, outside autocast
    assert len(calls) == 1


def test_hooked_gelu_modules_are_not_replaced_and_exceptions_restore():
    model = build_planted_transformer()
    gelus = [m for m in model.modules() if type(m) is GELU]
    gelus[0].register_forward_hook(lambda module, args, out: out)  # a stand-in would not run it
    with pytest.raises(KeyboardInterrupt), fused_gelu_projections([model]):
        assert [type(m) for m in model.modules() if isinstance(m, (GELU, FusedTanhGelu))] == [GELU] + [
            FusedTanhGelu
        ] * (len(gelus) - 1)
        raise KeyboardInterrupt
    assert [m for m in model.modules() if type(m) is GELU] == gelus


def test_both_experts_fused_through_routed():
    """intercept.routed, which a plan applied on the Triton backend enters with fuse=True: every
    transformer of the model (Wan 2.2's two experts) gets the stand-ins, and they leave with it."""
    from paro_cli.intercept import StockAttention, routed
    from paro_cli.models.loading import load_model

    experts = load_model("planted-experts", "float32", torch.device("cpu"))
    with routed(experts.components, experts.adapter, dict.fromkeys(experts.components, StockAttention()), fuse=True):
        assert all(any(type(m) is FusedTanhGelu for m in t.modules()) for t in experts.components.values())
    assert not any(type(m) is FusedTanhGelu for t in experts.components.values() for m in t.modules())


def test_cpu_runs_the_stock_path(monkeypatch):
    """Off CUDA the op's GELU is the exact one: the stand-in must not call it."""
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: pytest.fail("fused op called on CPU"))
    model = build_planted_transformer()
    ff, _, x = feed_forward_input(model)
    with torch.no_grad():
        stock = ff(x)
        with fused_gelu_projections([model]):
            assert torch.equal(ff(x), stock)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_cuda_op_is_the_tanh_gelu(dtype, bound):
    """On the GPU, against float64: the tanh GELU of the GEMM, not the exact GELU, which the
    float32 case tells apart (H100: 2.2e-6 from the tanh GELU, 1.9e-4 from the exact one)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 1024).cuda().to(dtype)
    stock = GELU(256, 1024, approximate="tanh")
    stock.proj = linear
    x = 2 * torch.randn(3, 500, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert FusedTanhGelu(stock)._fusable(x)
        fused = FusedTanhGelu(stock)(x)
        pre = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert rel_l2(fused, F.gelu(pre, approximate="tanh")) < bound
    if dtype == torch.float32:
        assert rel_l2(fused, F.gelu(pre)) > 10 * bound
