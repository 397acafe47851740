"""Plan files: round trip, bit packing, refusal of plans that do not fit the run."""

import json

import pytest
import torch
from safetensors.torch import save_file

from paro_cli.errors import PlanError
from paro_cli.plan import load_plan, pack_bits, unpack_bits


def test_bit_packing_round_trip_and_order():
    mask = torch.rand(3, 2, 7, 7) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, 7)  # ceil(49 / 8)
    assert torch.equal(unpack_bits(packed, (7, 7)), mask)
    one = torch.zeros(1, 3, 3, dtype=torch.bool)
    one[0, 0, 0] = True  # first block -> most significant bit of the first byte
    assert pack_bits(one).tolist() == [[128, 0]]


def test_round_trip(planted_calibration, tmp_path):
    _, plan = planted_calibration
    path = tmp_path / "p.safetensors"
    plan.save(path)
    back = load_plan(path)
    assert back.header() == plan.header()
    a, b = plan.components["transformer"], back.components["transformer"]
    for slot in range(plan.num_slots):
        assert torch.equal(a.slot_masks(slot), b.slot_masks(slot))
    for name in ("achieved_density", "target_density", "recall", "incoherence"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary left behind


def test_header_is_self_describing(planted_calibration, tmp_path):
    _, plan = planted_calibration
    plan.save(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["paro"])
    for key in (
        "format_version",
        "tool_version",
        "model_id",
        "family",
        "grid",
        "text_tokens",
        "text_position",
        "block_size",
        "slot_bounds",
        "qk",
        "pv",
        "prompts",
        "seeds",
        "candidate_orders",
    ):
        assert key in header
    assert header["components"]["transformer"]["config_fingerprint"]
    summary = plan.summary()
    head = summary["components"]["transformer"]["per_layer"][0]["heads"][0]
    assert head["order"] == "HWF" and len(head["density"]) == plan.num_slots


def test_refuses_mismatched_runs(planted_calibration):
    from paro_kernels.layout import SequenceLayout

    _, plan = planted_calibration
    fp = plan.components["transformer"].config_fingerprint
    video = SequenceLayout(0)
    plan.check_run(family="wan", fingerprints={"transformer": fp}, grid=plan.grid)
    plan.check_layout(video)
    with pytest.raises(PlanError, match="flux model"):
        plan.check_run(family="flux", fingerprints={"transformer": fp}, grid=plan.grid)
    with pytest.raises(PlanError, match="another transformer config"):
        plan.check_run(family="wan", fingerprints={"transformer": "0" * 16}, grid=plan.grid)
    with pytest.raises(PlanError, match="token grid of 8x16x16, this run has 4x16x16"):
        plan.check_run(family="wan", fingerprints={"transformer": fp}, grid=(4, 16, 16))
    with pytest.raises(PlanError, match=r"0 text tokens \(none\) in self-attention, this run has 226 \(prefix\)"):
        plan.check_layout(SequenceLayout(226, True))


def _resave(plan_path, out, header=None, drop=None, reshape=None):
    """A copy of a plan file with its header or one tensor changed."""
    from safetensors import safe_open

    with safe_open(str(plan_path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if header is not None:
        meta = {"paro": header(json.loads(meta["paro"])) if callable(header) else header}
        if not isinstance(meta["paro"], str):
            meta["paro"] = json.dumps(meta["paro"])
    if drop:
        tensors.pop(drop)
    if reshape:
        tensors[reshape] = tensors[reshape][:1].contiguous()
    save_file(tensors, str(out), metadata=meta)


def test_damaged_plans_are_refused_cleanly(planted_calibration, tmp_path):
    _, plan = planted_calibration
    good = tmp_path / "good.safetensors"
    plan.save(good)
    cases = {
        "not json": dict(header="{not json"),
        "no grid": dict(header=lambda h: {k: v for k, v in h.items() if k != "grid"}),
        "no density": dict(header=lambda h: {k: v for k, v in h.items() if k != "density"}),
        "missing tensor": dict(drop="transformer.recall"),
        "short masks": dict(reshape="transformer.masks"),
        "other block size": dict(header=lambda h: {**h, "block_size": 32}),
        # a component listing the slots it runs must hold masks of exactly those
        "slots run, masks of all": dict(
            header=lambda h: {**h, "components": {n: {**c, "slots_run": [0]} for n, c in h["components"].items()}}
        ),
        "slots run out of range": dict(
            header=lambda h: {
                **h,
                "components": {
                    n: {**c, "slots_run": list(range(1, len(h["slot_bounds"]) + 2))} for n, c in h["components"].items()
                },
            }
        ),
    }
    for name, change in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        _resave(good, bad, **change)
        with pytest.raises(PlanError, match="is damaged"):
            load_plan(bad)


def test_bad_files(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a plan at all")
    with pytest.raises(PlanError, match="not a readable plan"):
        load_plan(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PlanError, match="not a paro plan"):
        load_plan(tmp_path / "other.safetensors")
    save_file(
        {"x": torch.zeros(2)},
        str(tmp_path / "future.safetensors"),
        metadata={"paro": json.dumps({"format_version": 99})},
    )
    with pytest.raises(PlanError, match="plan format 99"):
        load_plan(tmp_path / "future.safetensors")
