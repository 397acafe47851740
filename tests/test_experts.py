"""Two transformers switched at a timestep boundary (Wan 2.2 A14B's experts), on CPU with the
"planted-experts" model: two planted Wan transformers with different planted orders. One plan
holds a component per expert, each calibrated on the steps its expert runs."""

import json

import pytest
import torch

from paro_cli.api import apply
from paro_cli.calibration import calibrate
from paro_cli.calibration.rules import slot_of_steps
from paro_cli.cli import main
from paro_cli.errors import PlanError
from paro_cli.intercept import AttentionInterceptor, routed
from paro_cli.models.loading import load_model
from paro_cli.models.planted import PLANTED_BOUNDARY, PLANTED_EXPERT_2_ORDERS, PLANTED_ORDERS
from paro_cli.recipe import load_recipe
from paro_cli.runner import sample

from conftest import Recorder, rel_l2

SMALL = {
    "model": "planted-experts",
    "sampling.steps": 4,
    "sparsity.block_size": 16,
    "geometry.frames": 4,
    "geometry.height": 16,
    "geometry.width": 16,
}


@pytest.fixture(scope="module")
def experts():
    return load_model("planted-experts", "float32", torch.device("cpu"))


def test_each_expert_runs_its_side_of_the_boundary_and_the_call_site_is_restored(experts):
    from diffusers.models.transformers import transformer_wan

    stock_fn = transformer_wan.dispatch_attention_fn
    recipe = load_recipe("planted", SMALL)
    handlers = {"transformer": Recorder(), "transformer_2": Recorder()}
    with routed(experts.components, experts.adapter, handlers):
        with pytest.raises(PlanError, match="already applied to this transformer"):
            AttentionInterceptor(experts.transformer_2, experts.adapter, Recorder()).__enter__()
        sample(experts, recipe, ["a red circle"], [0], decode=False)
    assert transformer_wan.dispatch_attention_fn is stock_fn
    high, low = handlers["transformer"].timesteps, handlers["transformer_2"].timesteps
    assert high and low and min(high) >= PLANTED_BOUNDARY > max(low)


def test_each_expert_gets_its_planted_orders_and_masks_of_its_own_steps(experts):
    recipe = load_recipe("planted", SMALL)
    plan = calibrate(experts, recipe)
    assert sorted(plan.components) == ["transformer", "transformer_2"]
    assert plan.components["transformer"].orders == [list(o) for o in PLANTED_ORDERS]
    assert plan.components["transformer_2"].orders == [list(o) for o in PLANTED_EXPERT_2_ORDERS]
    slots = slot_of_steps(recipe.sampling.steps, recipe.sparsity.slots)
    for name, runs in (
        ("transformer", lambda t: t >= PLANTED_BOUNDARY),
        ("transformer_2", lambda t: t < PLANTED_BOUNDARY),
    ):
        own = sorted({slot for slot, t in zip(slots, plan.calibration_timesteps) if runs(t)})
        comp = plan.components[name]
        assert comp.slots_run == own and comp.packed_masks.shape[0] == len(own)  # its own slots stored, no fillers
        for slot in range(plan.num_slots):
            kept = comp.slot_masks(slot).float().mean(dim=(-1, -2))
            assert (kept < 0.6).all() if slot in own else (kept == 1).all(), (name, slot)  # other slots run dense


def test_density_one_plan_equals_stock_and_splits_calls_between_experts(experts):
    recipe = load_recipe("planted", {**SMALL, "sparsity.density": 1.0})
    plan = calibrate(experts, recipe)
    stock = sample(experts, recipe, ["a blue square"], [3], decode=False)
    with apply(experts, plan, backend="torch", grid=plan.grid) as run:
        out = sample(experts, recipe, ["a blue square"], [3], decode=False)
    calls = {name: h.calls["paro"] for name, h in run.handlers.items()}
    assert sum(calls.values()) == 4 * 2 and all(calls.values())  # 4 steps x 2 layers, both experts used
    assert rel_l2(out, stock) <= 1e-5


def test_plans_are_refused_across_one_and_two_transformers(experts, planted_model, planted_calibration):
    recipe = load_recipe("planted", SMALL)
    plan = calibrate(experts, recipe)
    with pytest.raises(PlanError, match="transformer_2' this model lacks"):
        plan.check_run(family="wan", fingerprints=planted_model.fingerprints(), grid=plan.grid)
    single = planted_calibration[1]
    with pytest.raises(PlanError, match="no component 'transformer_2'"):
        single.check_run(family="wan", fingerprints=experts.fingerprints(), grid=single.grid)


def test_cli_calibrates_and_generates_with_two_experts(capsys, tmp_path):
    plan = tmp_path / "experts.safetensors"
    args = ["--recipe", "planted", "--model", "planted-experts", "--steps", "3"]
    with pytest.raises(SystemExit) as done:
        main(["calibrate", *args, "--out", str(plan), "--json"])
    assert done.value.code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["components"]) == ["transformer", "transformer_2"]
    with pytest.raises(SystemExit) as done:
        main(["generate", *args, "--plan", str(plan), "--out", str(tmp_path / "v.gif"), "--json"])
    assert done.value.code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["attention_calls"] == {"paro": 3 * 2}


def test_guidance_2_needs_two_experts(planted_model, experts):
    from paro_cli.errors import RecipeError

    recipe = load_recipe("planted", {**SMALL, "sampling.steps": 2, "sampling.guidance_2": 1.0})
    with pytest.raises(RecipeError, match="guidance_2"):
        sample(planted_model, recipe, ["a red circle"], [0], decode=False)
    low_guided = sample(experts, recipe, ["a red circle"], [0], decode=False)
    assert not torch.equal(
        low_guided,
        sample(experts, load_recipe("planted", {**SMALL, "sampling.steps": 2}), ["a red circle"], [0], decode=False),
    )


@pytest.mark.gpu
def test_two_experts_on_the_triton_backend():
    """bf16 on the GPU: 8-bit plans per expert through the Triton kernels (and the fused norm +
    RoPE processors), each expert's calls through its own component."""
    experts = load_model("planted-experts", "bfloat16", torch.device("cuda"))
    recipe = load_recipe(
        "planted",
        {**SMALL, "sparsity.block_size": 32, "precision.qk": "int8", "precision.pv": "fp8", "backend": "triton"},
    )
    plan = calibrate(experts, recipe)  # (the orders found are checked on CPU, at 16-token blocks)
    dense = sample(experts, recipe, ["a red circle"], [0], decode=False)
    with apply(experts, plan, backend="triton", grid=plan.grid) as run:
        out = sample(experts, recipe, ["a red circle"], [0], decode=False)
    assert run.backend.name == "triton" and all(h.calls["paro"] for h in run.handlers.values())
    assert torch.isfinite(out).all() and 1e-4 < rel_l2(out, dense) < 0.3


def test_compiled_experts_each_run_their_own_plan(experts):
    """Both experts are the same class with the same code: a compiled forward traced for the
    first must not be reused for the second with the first's handler (backend "eager": Dynamo's
    tracing and guards, no code generation)."""
    recipe = load_recipe("planted", SMALL)
    plan = calibrate(experts, recipe)
    with apply(experts, plan, backend="torch", grid=plan.grid):
        eager = sample(experts, recipe, ["a red circle"], [0], decode=False)
        stock = {name: tr.forward for name, tr in experts.components.items()}
        try:
            for tr in experts.components.values():
                tr.forward = torch.compile(tr.forward, fullgraph=True, backend="eager")
            compiled = sample(experts, recipe, ["a red circle"], [0], decode=False)
        finally:
            for name, tr in experts.components.items():
                tr.forward = stock[name]
    assert rel_l2(compiled, eager) <= 1e-6


def test_an_expert_the_schedule_never_runs_gets_a_dense_component(experts):
    recipe = load_recipe("planted", {**SMALL, "sampling.steps": 1})  # the one step (t = 1) is the high-noise expert's
    plan = calibrate(experts, recipe)
    idle = plan.components["transformer_2"]
    assert idle.slots_run == [] and idle.slot_masks(0).all() and idle.orders == [["FHW", "FHW"]] * 2
    assert (plan.components["transformer"].achieved_density < 0.6).all()


def test_plan_file_holds_each_experts_own_slots(experts, tmp_path):
    from paro_cli.plan import load_plan

    plan = calibrate(experts, load_recipe("planted", SMALL))
    plan.save(tmp_path / "p.safetensors")
    loaded = load_plan(tmp_path / "p.safetensors")
    slots = slot_of_steps(4, "half")
    high = sorted({s for s, t in zip(slots, plan.calibration_timesteps) if t >= PLANTED_BOUNDARY})
    low = sorted({s for s, t in zip(slots, plan.calibration_timesteps) if t < PLANTED_BOUNDARY})
    summary = loaded.summary()["components"]
    assert (loaded.components["transformer"].slots_run, loaded.components["transformer_2"].slots_run) == (high, low)
    for name in ("transformer", "transformer_2"):
        assert abs(summary[name]["mean_density"] - 0.3) < 0.02
        for slot in range(plan.num_slots):  # the file gives back what calibration made
            assert torch.equal(loaded.components[name].slot_masks(slot), plan.components[name].slot_masks(slot))


def test_local_window_baseline_of_an_experts_plan_covers_every_slot(experts, tmp_path):
    from paro_cli.baselines import local_window_plan
    from paro_cli.masks import local_window_mask
    from paro_cli.plan import load_plan

    plan = calibrate(experts, load_recipe("planted", SMALL))
    window = local_window_plan(plan)
    window.save(tmp_path / "w.safetensors")  # a consistent file: masks of every slot, none listed as run
    expected = local_window_mask(plan.grid, plan.block_size, plan.density)
    for comp in load_plan(tmp_path / "w.safetensors").components.values():
        assert all((comp.slot_masks(slot) == expected).all() for slot in range(plan.num_slots))
