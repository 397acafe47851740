"""Quality benchmark pieces: the baselines' masks and plans, gates, and `paro bench quality`
end to end on the planted model (whose planted heads make reordering matter)."""

import json
import math

import imageio.v3 as iio

from paro_cli.baselines import local_window_plan
from paro_cli.bench.quality import _with, gate_failures, paired_leads, standard_error
from paro_cli.masks import local_window_mask
from paro_cli.recipe import RECIPES_DIR, load_recipe

from conftest import paro


def test_local_window_plan_replaces_orders_and_masks(planted_calibration):
    _, plan = planted_calibration
    window = local_window_plan(plan)
    comp = window.components["transformer"]
    assert all(o == "FHW" for row in comp.orders for o in row)
    expected = local_window_mask(plan.grid, plan.block_size, plan.density)
    for slot in range(window.num_slots):
        assert (comp.slot_masks(slot) == expected).all()
    assert plan.components["transformer"].orders != comp.orders  # the original is untouched


def test_paro_leads_are_paired_prompt_by_prompt():
    assert standard_error([30.0]) is None
    assert math.isclose(standard_error([1.0, 2.0, 6.0]), math.sqrt(7 / 3), abs_tol=1e-3)  # stdev sqrt(7), 3 values

    def row(variant, per_prompt, qk="fp32"):
        return {"variant": variant, "density": 0.3, "qk": qk, "pv": "fp32", "psnr_db_per_prompt": per_prompt}

    rows = [row("dense", [100.0, 100.0]), row("paro", [30.0, 20.0]), row("paro", [9.0, 9.0], qk="int8")]
    rows += [row("no reordering", [28.0, 19.0]), row("local window", [31.0, 10.0])]
    paired_leads(rows)
    # differences (2, 1): lead 1.5, stdev 0.707, standard error 0.5; unpaired, the spread between
    # the prompts (10 dB) would swamp it
    assert (rows[3]["paro_lead_db"], rows[3]["paro_lead_se"]) == (1.5, 0.5)
    assert (rows[4]["paro_lead_db"], rows[4]["paro_lead_se"]) == (4.5, 5.5)  # (-1, 10): against the fp32 paro row
    assert not any("paro_lead_db" in r for r in rows[:3])


def test_gates_name_the_failing_variant():
    rows = [
        {"variant": "dense", "density": 1.0, "qk": "fp32", "pv": "fp32", "psnr_db": 100.0, "fidelity_drop": 0.0},
        {"variant": "paro", "density": 0.3, "qk": "int8", "pv": "fp8", "psnr_db": 28.0, "fidelity_drop": 0.05},
        {"variant": "local window", "density": 0.3, "qk": "fp32", "pv": "fp32", "psnr_db": 10.0, "fidelity_drop": 0.5},
    ]
    assert gate_failures(rows, 30, None) == ["paro d=0.3 int8/fp8: PSNR 28.00 dB < --min-psnr 30"]
    assert gate_failures(rows, None, 3) == ["paro d=0.3 int8/fp8: fidelity drop 5.0 points > --max-drop 3"]
    assert gate_failures(rows, 20, 10) == []


def test_bench_quality_end_to_end(capsys, tmp_path):
    args = [
        "bench",
        "quality",
        "--recipe",
        "planted",
        "--steps",
        "2",
        "--prompts",
        "2",
        "--density",
        "0.3",
        "--video",
        tmp_path / "side.gif",
        "--heatmaps",
        tmp_path / "maps",
        "--layer",
        "1",
        "--head",
        "0",
        "--json",
    ]
    code, stdout, err = paro(capsys, *args, "--min-psnr", "500")
    assert code == 3 and err.startswith("gate failed: paro d=0.3 fp32/fp32: PSNR") and err.count("\n") == 1
    data = json.loads(stdout)
    variants = [(r["variant"], r["density"]) for r in data["rows"]]
    assert variants == [("dense", 1.0), ("paro", 0.3), ("no reordering", 0.3), ("local window", 0.3)]
    dense, paro_row = data["rows"][0], data["rows"][1]
    assert dense["psnr_db"] == 100.0 and dense["ssim"] == 1.0 and paro_row["psnr_db"] < 100
    for r in data["rows"]:
        assert len(r["psnr_db_per_prompt"]) == 2 and abs(sum(r["psnr_db_per_prompt"]) / 2 - r["psnr_db"]) < 2e-3
    for baseline in data["rows"][2:]:
        assert abs(baseline["paro_lead_db"] - (paro_row["psnr_db"] - baseline["psnr_db"])) < 2e-3
        assert baseline["paro_lead_se"] >= 0
    assert len(data["prompts"]) == 2 and data["gates"]
    assert data["evaluation"] == "held-out" and data["seeds"] == [10_000, 10_001]
    assert not set(data["prompts"]) & set(data["calibration_prompts"])
    assert iio.imread(tmp_path / "side.gif").shape == (8, 32, 66, 3)  # dense | 2-pixel bar | paro
    maps = data["heatmaps"]
    assert maps["order"] == "FWH" and 0 < maps["kept_mass"] <= 1  # layer 1 head 0 is planted FWH
    assert iio.imread(maps["after"]).shape == (512, 512, 3)


def test_bench_quality_refuses_bad_input(capsys, tmp_path):
    code, _, err = paro(capsys, "bench", "quality", "--recipe", "planted", "--prompt", "a cat", "--max-drop", "3")
    assert code == 2 and "--max-drop needs prompt fidelity" in err
    code, _, err = paro(capsys, "bench", "quality", "--recipe", "planted", "--precision", "int9/fp8")
    assert code == 2 and "bad --precision" in err
    code, _, err = paro(capsys, "bench", "quality", "--recipe", "planted", "--video", tmp_path / "x.avi")
    assert code == 2 and "unknown extension" in err
    code, _, err = paro(capsys, "bench", "quality", "--recipe", "planted", "--prompt-set", "test")
    assert code == 2 and "unknown --prompt-set 'test'" in err and err.count("\n") == 1


def test_paro_variants_keep_the_recipes_allowed_orders():
    recipe = load_recipe("planted", {"calibration.orders": ["HWF", "FWH"]})
    variant = _with(recipe, 0.3, "int8", "fp8")
    assert (
        variant.calibration.orders == ("HWF", "FWH")
        and variant.sparsity.density == 0.3
        and variant.precision.qk == "int8"
    )
    assert _with(recipe, 0.3, "fp32", "fp32", orders=("FHW",)).calibration.orders == ("FHW",)


def test_bench_quality_measures_a_given_plan_without_calibrating(capsys, tmp_path, monkeypatch, planted_calibration):
    _, plan = planted_calibration
    path = tmp_path / "plan.safetensors"
    plan.save(path)

    def no_calibration(*_):
        raise AssertionError("calibrated although --plan was given")

    monkeypatch.setattr("paro_cli.bench.quality.calibrate", no_calibration)
    code, stdout, _ = paro(
        capsys,
        "bench",
        "quality",
        "--recipe",
        "planted",
        "--steps",
        "2",
        "--prompts",
        "1",
        "--no-baselines",
        "--plan",
        path,
        "--json",
    )
    assert code == 0
    data = json.loads(stdout)
    rows = data["rows"]
    assert data["plan"]["path"] == str(path) and data["plan"]["calibration_prompts"] == list(plan.prompts)
    assert [(r["variant"], r["density"], r["qk"]) for r in rows] == [
        ("dense", 1.0, "fp32"),
        ("paro", plan.density, plan.qk),
    ]
    code, _, err = paro(capsys, "bench", "quality", "--recipe", "planted", "--plan", path, "--density", "0.9")
    assert code == 2 and f"is for density {plan.density}" in err and "--density" in err.splitlines()[-1]
    code, _, err = paro(
        capsys, "bench", "quality", "--recipe", "tiny", "--plan", path
    )  # another model: refused up front
    assert code == 2 and "calibrated for another transformer" in err and err.count("\n") == 1
    other = tmp_path / "blocks32.yaml"  # the planted recipe with another block size
    other.write_text((RECIPES_DIR / "planted.yaml").read_text().replace("block_size: 64", "block_size: 32"))
    code, _, err = paro(capsys, "bench", "quality", "--recipe", other, "--plan", path)
    assert code == 2 and "baselines would not compare" in err


def test_bench_quality_takes_the_geometry_and_every_progress_row_completes(capsys, monkeypatch):
    """--frames/--height/--width reach the run (the planted model's grid is frames x h/2 x w/2),
    and each progress row, the calibration passes' included, advances to its total."""
    from paro_cli.output import StepProgress

    rows = {}
    monkeypatch.setattr(StepProgress, "start", lambda self, name, total: rows.__setitem__(name, [0, total]))
    monkeypatch.setattr(StepProgress, "step", lambda self, i: rows[list(rows)[-1]].__setitem__(0, i + 1))
    code, stdout, _ = paro(
        capsys,
        "bench",
        "quality",
        "--recipe",
        "planted",
        "--frames",
        "4",
        "--height",
        "24",
        "--width",
        "16",
        "--steps",
        "2",
        "--prompts",
        "1",
        "--density",
        "0.3",
        "--no-baselines",
        "--json",
    )
    assert code == 0 and json.loads(stdout)["grid"] == [4, 12, 8]
    assert list(rows) == ["dense", "paro d=0.3 fp32/fp32: profiling orders and masks", "paro d=0.3 fp32/fp32"]
    assert all(done == total == 2 for done, total in rows.values())


def test_quality_prompt_sets_are_fixed_and_disjoint():
    """The held-out set shares no caption with the recipe's calibration prompts and is not the
    first training step's scenes (the in-sample set); the validation set shares none with either
    the calibration prompts or the held-out set."""
    from paro_cli.bench.quality import VALIDATION_EXCLUDES, demo_prompts
    from paro_cli.recipe import load_recipe

    recipe = load_recipe("tiny")
    held, in_sample = demo_prompts(24, recipe), demo_prompts(24, recipe, "in-sample")
    validation = demo_prompts(24, recipe, "validation")
    assert len(set(held)) == 24 and not set(held) & set(recipe.calibration.prompts)
    assert held[:4] != in_sample[:4]
    assert len(set(validation)) == 24 and not set(validation) & set(recipe.calibration.prompts)
    assert not set(validation) & set(demo_prompts(VALIDATION_EXCLUDES, recipe))
    assert demo_prompts(24, recipe) == held and demo_prompts(24, recipe, "validation") == validation  # fixed sets
