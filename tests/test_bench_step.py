"""The step benchmark (paro_cli/bench/step.py): dense, no attention and each synthetic plan timed on one step."""

import pytest
import torch

from paro_cli.models import adapter_for
from paro_cli.models.loaded import LoadedModel
from paro_cli.models.planted import build_planted_cogvideox


@pytest.mark.parametrize("compiled", [False, True])
def test_step_bench_times_dense_no_attention_and_each_plan(compiled, monkeypatch):
    """The architecture step bench on a small planted model (CPU, torch backend): one row per
    variant, the synthetic plans at their density, every paro call through the plan; compiled,
    one fresh fullgraph compile per variant, and the stock forward back after."""
    from paro_cli.bench import step as step_bench
    from paro_cli.models.architectures import ARCHITECTURES  # noqa: F401  (the CLI's table imports)

    real_compile, compiles = torch.compile, []
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: compiles.append(kw) or real_compile(fn, backend="aot_eager", **kw)
    )  # no C++ build on CPU

    model = build_planted_cogvideox()
    adapter = adapter_for(model)
    loaded = LoadedModel(
        "planted-cogvideox", model, adapter, torch.device("cpu"), torch.float32, None, adapter.prompt_encoder(model)
    )
    grid = (4, 8, 8)
    inputs = adapter.forward_inputs(
        model, torch.randn(2, 4, 4, 16, 16), torch.tensor(500.0), torch.randn(2, 8, 16), grid, 6.0
    )
    # compiled: more variants than dynamo keeps compiled entries of one code object (8)
    pairs = [
        ("fp32", "fp32"),
        ("bf16", "bf16"),
        ("fp16", "fp16"),
        ("int8", "fp8"),
        ("fp8", "fp8"),
        ("int4", "int8"),
        ("int8", "bf16"),
    ]
    pairs = pairs if compiled else pairs[:1]
    result = step_bench.run(loaded, inputs, grid, [0.5, 0.25], pairs, 16, compiled, 1, "torch")
    assert [(r["variant"], r["density"], r["qk"]) for r in result["rows"]] == [
        ("dense", 1.0, None),
        ("no attention", None, None),
    ] + [("paro torch", density, qk) for qk, _ in pairs for density in (0.5, 0.25)]
    assert compiles == [{"fullgraph": True}] * (2 + len(pairs)) * compiled and "forward" not in vars(model)
    assert result["text_tokens"] == 8 and result["batch"] == 2 and all(r["ms"] > 0 for r in result["rows"])
    plan = step_bench.synthetic_plan(loaded, grid, adapter.sequence_layout((), inputs), 0.25, 16, "fp32", "fp32")
    kept = plan.components["transformer"].slot_masks(0)
    assert kept.sum(-1).eq(4).all() and kept.diagonal(dim1=-2, dim2=-1).all()  # 4 of 16 blocks per row, diagonal kept
