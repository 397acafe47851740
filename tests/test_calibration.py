"""Calibration: planted structure with known answers, and the mask and slot rules."""

import math

import pytest
import torch

from paro_cli.calibration.rules import choose_orders, dense_above, profiled_steps, slot_bounds, slot_of_steps
from paro_cli.models.planted import PLANTED_ORDERS
from paro_kernels.orders import candidate_orders


def test_planted_orders_are_found(planted_calibration):
    _, plan = planted_calibration
    assert plan.components["transformer"].orders == [list(o) for o in PLANTED_ORDERS]


def test_planted_order_wins_on_recall_alone(planted_calibration):
    """The planted order has the strictly best mass recall, beyond the tie tolerance."""
    _, plan = planted_calibration
    comp = plan.components["transformer"]
    names = candidate_orders(plan.grid)
    for layer, orders in enumerate(PLANTED_ORDERS):
        for head, order in enumerate(orders):
            recall = comp.recall[layer, head]
            best = recall[names.index(order)]
            others = torch.cat([recall[: names.index(order)], recall[names.index(order) + 1 :]])
            assert best > others.max() + 0.005


def test_masks_hit_target_density_and_keep_forced_blocks(planted_calibration):
    recipe, plan = planted_calibration
    comp = plan.components["transformer"]
    nb = plan.num_blocks
    n = math.prod(plan.grid)
    for slot in range(plan.num_slots):
        masks = comp.slot_masks(slot)
        for layer in range(comp.num_layers):
            kept = masks[layer]
            # the shared threshold lands on the target exactly (far within one block per row)
            assert int(kept.sum()) == round(recipe.sparsity.density * kept.numel())
            assert kept[:, torch.arange(nb), torch.arange(nb)].all()
    assert n % plan.block_size == 0  # the demo grid has no ragged tail; select_blocks tests cover it
    torch.testing.assert_close(
        comp.achieved_density.mean(dim=2), torch.full((plan.num_slots, comp.num_layers), 0.3), atol=1 / nb**2, rtol=0
    )


def test_choose_orders_rules():
    recall = torch.tensor([[[0.90, 0.898, 0.80], [0.5, 0.6, 0.7]]])
    incoherence = torch.tensor([[[5.0, 3.0, 1.0], [1.0, 2.0, 3.0]]])
    # head 0: candidates 0 and 1 tie within 0.005, 1 is more coherent; candidate 2 is out of reach
    assert choose_orders(recall, incoherence, 0.3, quantised=False).tolist() == [[1, 2]]
    assert choose_orders(recall, incoherence, 1.0, quantised=True).tolist() == [[2, 0]]
    assert choose_orders(recall, incoherence, 1.0, quantised=False).tolist() == [[0, 0]]


def test_slots_and_timestep_map():
    assert slot_of_steps(10, "half") == [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]
    assert slot_of_steps(3, "single") == [0, 0, 0]
    ts = [1.0, 0.9, 0.7, 0.4, 0.1]
    slots = slot_of_steps(5, "half")  # [0, 1, 2, 2, 2]
    bounds = slot_bounds(ts, slots)
    assert bounds == pytest.approx([0.95, 0.8])
    assert dense_above(ts, 0) is None
    assert dense_above(ts, 2) == pytest.approx(0.8)
    assert dense_above(ts, 9) == -1.0
    assert profiled_steps(10, None) == set(range(10))
    assert profiled_steps(10, 3) == {0, 4, 9}


def test_plan_maps_other_step_counts_by_timestep(planted_calibration):
    _, plan = planted_calibration
    cal = plan.calibration_timesteps
    assert [plan.slot_of(t) for t in cal] == slot_of_steps(len(cal), plan.slot_policy)
    fine = torch.linspace(1.0, 0.0, 50).tolist()  # a 50-step schedule
    slots = [plan.slot_of(t) for t in fine]
    assert slots == sorted(slots) and slots[0] == 0 and slots[-1] == plan.num_slots - 1


def test_restricted_orders_are_obeyed_and_checked(planted_model, monkeypatch):
    from paro_cli import runner
    from paro_cli.calibration import calibrate
    from paro_cli.errors import RecipeError
    from paro_cli.recipe import load_recipe

    recipe = load_recipe("planted", {"sampling.steps": 2, "calibration.orders": ["FHW"]})
    plan = calibrate(planted_model, recipe)
    assert plan.components["transformer"].orders == [["FHW", "FHW"], ["FHW", "FHW"]]
    with pytest.raises(RecipeError, match="calibration.orders"):
        load_recipe("planted", {"calibration.orders": ["FHX"]})
    runs = []
    monkeypatch.setattr(runner, "sample", lambda *a, **k: runs.append(1))
    with pytest.raises(RecipeError, match="not an order of this grid"):
        calibrate(
            planted_model,
            load_recipe("planted", {"sampling.steps": 2, "geometry.frames": 1, "calibration.orders": ["FHW"]}),
        )
    assert not runs  # refused before the first sampling pass


def test_steps_are_counted_by_the_sampler_not_told_apart_by_timestep():
    """Two steps whose timesteps round to one bf16 value stay two steps; the forwards of one
    step (e.g. CFG passes) share it."""
    from paro_cli.steps import StepTracker
    from paro_kernels.layout import SequenceLayout

    tracker, layout = StepTracker(), SequenceLayout(0)
    seen = []
    for t in (1.0, 1.0, 0.99):  # steps 0 and 1 share a timestep
        seen += [tracker.see((2, 4, 4), layout, t), tracker.see((2, 4, 4), layout, t)]  # two forwards each
        tracker.step_done()
    assert seen == [0, 0, 1, 1, 2, 2] and tracker.timesteps == {0: 1.0, 1: 1.0, 2: 0.99}


def test_one_run_gives_the_plan_of_two(planted_model, planted_calibration, monkeypatch):
    """Calibration in one sampling run (every allowed order's mass kept per slot) chooses the
    orders and masks that a profiling run followed by a mask run gives, and samples once."""
    from paro_cli import runner
    from paro_cli.calibration import calibrate, passes

    recipe, one = planted_calibration
    runs = []
    sample = runner.sample
    monkeypatch.setattr(runner, "sample", lambda *a, **k: runs.append(1) or sample(*a, **k))
    monkeypatch.setattr(passes, "ONE_RUN_BYTES", 0)
    two = calibrate(planted_model, recipe)
    assert len(runs) == 2
    a, b = one.components["transformer"], two.components["transformer"]
    assert a.orders == b.orders
    for slot in range(one.num_slots):
        assert torch.equal(a.slot_masks(slot), b.slot_masks(slot))
    torch.testing.assert_close(a.recall, b.recall, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.incoherence, b.incoherence, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    runs.clear()
    monkeypatch.setattr(runner, "sample", lambda *a, **k: runs.append(1) or sample(*a, **k))
    calibrate(planted_model, recipe)
    assert len(runs) == 1


def test_one_allowed_order_is_not_profiled(planted_model):
    """With nothing to choose, no order is scored: the plan's scores are NaN, not made up."""
    from paro_cli.calibration import calibrate
    from paro_cli.recipe import load_recipe

    plan = calibrate(planted_model, load_recipe("planted", {"sampling.steps": 2, "calibration.orders": ["HWF"]}))
    comp = plan.components["transformer"]
    assert comp.orders == [["HWF", "HWF"], ["HWF", "HWF"]]
    assert comp.recall.isnan().all() and comp.incoherence.isnan().all()


def test_global_allocation_shares_one_budget_over_all_layers(planted_model, planted_calibration, tmp_path):
    """`sparsity.allocation: global` keeps the layer plan's orders and total kept blocks per slot,
    spread unevenly over the layers by one threshold, and the plan says so (saved and shown)."""
    import dataclasses

    from paro_cli.calibration import calibrate
    from paro_cli.plan import load_plan

    recipe, per_layer = planted_calibration
    spread = dataclasses.replace(recipe, sparsity=dataclasses.replace(recipe.sparsity, allocation="global"))
    plan = calibrate(planted_model, spread)
    a, b = per_layer.components["transformer"], plan.components["transformer"]
    assert a.orders == b.orders and per_layer.allocation == "layer" and plan.allocation == "global"
    for slot in range(plan.num_slots):
        layer_masks, global_masks = a.slot_masks(slot), b.slot_masks(slot)
        # one budget: the layer plan's total but for each layer's own rounding
        assert int(global_masks.sum()) == round(recipe.sparsity.density * global_masks.numel())
        assert abs(int(global_masks.sum()) - int(layer_masks.sum())) <= b.num_layers
        per_layer_kept = global_masks.float().mean(dim=(1, 2, 3))
        assert per_layer_kept.max() - per_layer_kept.min() > 1 / plan.num_blocks**2  # not one density per layer
    plan.save(tmp_path / "g.safetensors")
    assert load_plan(tmp_path / "g.safetensors").allocation == "global"
