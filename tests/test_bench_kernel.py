"""`paro bench kernel`'s bookkeeping on the CPU, with a fake timer: every call is timed in
interleaved rounds, rows carry the median and range of their timings, ratios use the same
run's baselines, and a baseline that cannot run is reported, not dropped."""

import pytest
import torch

from paro_cli.bench import kernel as kb
from paro_kernels.triton_attention import INTERPRET


@pytest.mark.skipif(not INTERPRET, reason="the paro calls run under the CPU interpreter")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bench_times_every_call_in_interleaved_rounds(monkeypatch):
    calls = []

    def timer(fn):  # the n-th timing reads n ms
        calls.append(fn)
        return float(len(calls))

    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)  # eager Flex: no C++ build on CPU
    shape = kb.AttentionShape("tiny", 1, 2, (2, 4, 8), 32, 5)
    result = kb.run(
        [shape],
        [1.0, 0.5],
        [("bf16", "bf16"), ("int8", "fp8")],
        32,
        with_statistics=False,
        repeats=3,
        device=torch.device("cpu"),
        timer=timer,
    )

    rows = result["rows"]
    assert [(r["kernel"], r["density"]) for r in rows] == [
        ("SDPA flash", 1.0),
        ("SDPA cuDNN", 1.0),
        ("FlexAttention", 1.0),
        ("paro", 1.0),
        ("paro", 1.0),
        ("paro, identity order", 1.0),
        ("FlexAttention", 0.5),
        ("paro", 0.5),
        ("paro", 0.5),
        ("paro, identity order", 0.5),
    ]
    cudnn = rows[1]
    assert cudnn["ms"] is None and any("SDPA cuDNN" in why for why in result["skipped"])  # no cuDNN on a CPU
    timed = [r for r in rows if r["ms"] is not None]
    n = len(timed)
    assert len(calls) == 3 * n and calls[:n] == calls[n : 2 * n] == calls[2 * n :]  # rounds, each visiting every call
    for i, row in enumerate(timed):  # call i read i+1, n+i+1 and 2n+i+1 ms
        assert row["ms"] == n + i + 1 and row["ms_range"] == [i + 1, 2 * n + i + 1]
        assert row.get("vs_cudnn") is None
    flex = {r["density"]: r["ms"] for r in rows if r["kernel"] == "FlexAttention"}
    for row in rows:
        if row["kernel"].startswith("paro"):
            assert row["vs_flex_same_mask"] == pytest.approx(flex[row["density"]] / row["ms"])
    bf16 = rows[3]
    assert bf16["rel_l2_vs_sdpa"] < 2e-2  # dense paro in bf16 computes SDPA's attention


def test_bench_kernel_command_prints_table_and_json(capsys, monkeypatch):
    """The command's rendering of run()'s result, skipped baselines included (run() faked: its
    timings need a GPU)."""
    import json

    from paro_cli.cli import main

    spec = "1,2,2,4,8,32,5"
    rows = [
        dict(shape=spec, kernel="SDPA cuDNN", density=1.0, qk="bf16", pv="bf16", ms=None),
        dict(
            shape=spec,
            kernel="FlexAttention",
            density=0.5,
            qk="bf16",
            pv="bf16",
            ms=3.0,
            ms_range=[2.9, 3.3],
            tflops_effective=1.0,
            vs_cudnn=None,
            vs_flex_same_mask=None,
        ),
        dict(
            shape=spec,
            kernel="paro",
            density=0.5,
            qk="int8",
            pv="fp8",
            ms=2.0,
            ms_range=[1.9, 2.2],
            flex_ms=3.0,
            rel_l2_vs_sdpa=None,
            tflops_effective=1.5,
            vs_cudnn=None,
            vs_flex_same_mask=1.5,
        ),
    ]
    result = {
        "rows": rows,
        "skipped": [f"{spec}: SDPA cuDNN: RuntimeError: no cuDNN"],
        "statistics": None,
        "repeats": 3,
        "device": "a GPU",
        "torch": torch.__version__,
        "block": 32,
    }
    seen = {}

    def fake_run(shapes, densities, pairs, block, with_statistics, repeats, report=None):
        seen.update(shapes=[s.name for s in shapes], densities=densities, repeats=repeats, block=block)
        return result

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kb, "run", fake_run)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "kernel", "--shape", spec, "--density", "0.5", "--block-size", "32", "--repeats", "5", "--json"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert seen == {"shapes": [spec], "densities": [0.5], "repeats": 5, "block": 32}
    assert json.loads(out) == result
    with pytest.raises(SystemExit):
        main(["bench", "kernel", "--shape", spec, "--density", "0.5", "--block-size", "32"])
    table = capsys.readouterr().out
    assert "1.900-2.200" in table and "1.50x" in table and "skipped" in table
