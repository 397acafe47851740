"""Several processes (gloo on the CPU, as NCCL on GPUs): Ulysses context parallelism gives the
same plan and the same output as one process, and bad setups are refused before any work."""

import functools

import pytest
import torch

from paro_cli import parallel
from paro_cli.api import apply
from paro_cli.calibration import calibrate
from paro_cli.errors import ModelError
from paro_cli.models import adapter_for
from paro_cli.models.loaded import LoadedModel, token_grid
from paro_cli.models.loading import cast_transformer, resolve_device
from paro_cli.models.planted import (
    PLANTED_FLUX_ORDERS,
    PLANTED_ORDERS,
    build_planted_cogvideox,
    build_planted_flux,
    build_planted_transformer,
)
from paro_cli.recipe import load_recipe
from paro_cli.runner import sample

from conftest import rel_l2

BUILDERS = {"wan": build_planted_transformer, "flux": build_planted_flux}  # the families diffusers can split
# 4x8x8 video / 16x16 image tokens (the Flux one with 24 text tokens before them)
INPUTS = {
    "wan": {"geometry.frames": 4, "geometry.height": 16, "geometry.width": 16},
    "flux": {"geometry.frames": 1, "geometry.height": 32, "geometry.width": 32},
}


def loaded_planted(build, device=torch.device("cpu"), dtype=torch.float32) -> LoadedModel:
    model = build()
    cast_transformer(model, device, dtype)
    adapter = adapter_for(model)
    return LoadedModel("planted", model, adapter, device, dtype, None, adapter.prompt_encoder(model))


def calibrate_and_generate(path, dtype=torch.float32, backend="torch", precision=(None, None), block=16) -> None:
    """Each family: calibrate at density 0.3 (where the planted orders are the known answer),
    then sample with the plan; rank 0 saves plans and outputs to `path`."""
    if parallel.world_size() > 1 and not torch.cuda.is_available():
        # diffusers places rank r on accelerator r % device_count(), which is 0 on a CPU
        torch.accelerator.device_count = lambda: 1
    results = {}
    for family, build in BUILDERS.items():
        loaded = loaded_planted(build, resolve_device(), dtype)
        recipe = load_recipe(
            "planted", {"sampling.steps": 3, "sparsity.block_size": block, "sparsity.density": 0.3, **INPUTS[family]}
        )
        grid = token_grid(loaded, recipe)
        parallel.enable_ulysses(loaded, grid)
        plan = calibrate(loaded, recipe)
        with apply(loaded, plan, backend=backend, qk=precision[0], pv=precision[1], grid=grid) as run:
            out = sample(loaded, recipe, ["a red circle"], [0], decode=False)
        comp = plan.components["transformer"]
        results[family] = {
            "orders": comp.orders,
            "masks": comp.packed_masks,
            "recall": comp.recall,
            "output": out.cpu(),
            "calls": run.calls,
            "density": comp.achieved_density.mean().item(),
        }
    if parallel.is_primary():
        torch.save(results, path)


def refuse_on_rank_1() -> None:
    if torch.distributed.get_rank() == 1:
        raise ModelError("rank 1 refuses", "a fix")
    torch.distributed.barrier()  # rank 0 waits for a rank that never comes: the launcher must stop it


def test_two_processes_give_one_process_plan_and_output(tmp_path):
    calibrate_and_generate(tmp_path / "one.pt")
    parallel.launch(2, calibrate_and_generate, tmp_path / "two.pt", device_type="cpu")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for family in BUILDERS:
        a, b = one[family], two[family]
        assert a["orders"] == b["orders"], family
        assert torch.equal(a["masks"], b["masks"]), family
        assert torch.allclose(a["recall"], b["recall"], rtol=1e-5, atol=1e-6), family
        assert a["calls"] == b["calls"] and a["calls"]["paro"] > 0
        err = ((a["output"] - b["output"]).norm() / a["output"].norm()).item()
        assert err <= 1e-5, (family, err)
    # and what they agree on is the known answer: the planted orders, sparse masks
    assert one["wan"]["orders"] == [list(o) for o in PLANTED_ORDERS]
    assert one["flux"]["orders"] == [[o.replace("F", "") for o in layer] for layer in PLANTED_FLUX_ORDERS]
    assert all(one[family]["density"] < 0.5 for family in BUILDERS)


def test_a_workers_error_reaches_the_caller_as_itself():
    with pytest.raises(ModelError) as info:
        parallel.launch(2, refuse_on_rank_1, device_type="cpu")
    assert str(info.value) == "rank 1 refuses (a fix)"


def test_gathered_order_puts_shards_back_in_layout_order():
    for text_first in (True, False):
        text, visual, degree = 6, 12, 3
        layout_order = torch.arange(text + visual)  # token ids in the layout: text first, or visual first
        ids_text = layout_order[:text] if text_first else layout_order[visual:]
        ids_visual = layout_order[text:] if text_first else layout_order[:visual]
        shards = [
            torch.cat([t, v] if text_first else [v, t])
            for t, v in zip(ids_text.chunk(degree), ids_visual.chunk(degree))
        ]
        gathered = torch.cat(shards)[None]
        order, inverse = parallel.gathered_order(text, text + visual, degree, text_first, torch.device("cpu"))
        assert torch.equal(gathered[:, order], layout_order[None])
        assert torch.equal(layout_order[None][:, inverse], gathered)


def test_ulysses_refuses_what_it_cannot_split():
    wan = loaded_planted(build_planted_transformer)  # 2 heads
    parallel.check_ulysses(wan, 2, (4, 8, 8), 0)
    with pytest.raises(ModelError, match="2 attention heads, which 4 GPUs cannot share evenly"):
        parallel.check_ulysses(wan, 4, (4, 8, 8), 0)
    with pytest.raises(ModelError, match="255 video/image tokens cannot be split evenly over 2 GPUs"):
        parallel.check_ulysses(wan, 2, (3, 5, 17), 0)
    with pytest.raises(ModelError, match="25 text tokens"):
        parallel.check_ulysses(wan, 2, (4, 8, 8), 25)
    with pytest.raises(ModelError, match="no context-parallel plan for CogVideoXTransformer3DModel"):
        parallel.check_ulysses(loaded_planted(build_planted_cogvideox), 2, (4, 8, 8), 8)


def test_each_forward_checks_that_its_text_splits_too():
    """The text length shows only in a forward's inputs: checked there, before diffusers splits."""
    flux = loaded_planted(build_planted_flux)
    tr, adapter = flux.transformer, flux.adapter
    x = torch.randn(1, *adapter.input_shape(tr, 1, 32, 32))
    inputs = adapter.forward_inputs(tr, x, torch.tensor(500.0), flux.prompt_encoder(["a red circle"]), (1, 16, 16), 3.5)
    parallel._check_forward(adapter, 8, tr, (), inputs)  # 256 image and 24 text tokens: 8 GPUs split both
    with pytest.raises(ModelError, match="24 text tokens cannot be split evenly over 16 GPUs"):
        parallel._check_forward(adapter, 16, tr, (), inputs)


def test_ring_attention_is_refused():
    from types import SimpleNamespace

    wan = loaded_planted(build_planted_transformer)
    wan.transformer._parallel_config = SimpleNamespace(
        context_parallel_config=SimpleNamespace(ring_degree=2, ulysses_degree=1)
    )
    with pytest.raises(ModelError, match="runs ring attention"):
        parallel.local_heads(wan.transformer, 2)


def test_one_process_holds_every_head():
    wan = loaded_planted(build_planted_transformer)
    assert parallel.local_heads(wan.transformer, 2) == slice(0, 2)
    x = torch.randn(3, 2, 5)
    assert parallel.gather_heads(wan.transformer, x, 1) is x


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_give_one_gpu_plan_and_output_through_the_kernels(tmp_path):
    """NCCL, bf16 and the Triton kernels at INT8/FP8: plans equal, outputs within bf16 rounding."""
    job = functools.partial(
        calibrate_and_generate, dtype=torch.bfloat16, backend="triton", precision=("int8", "fp8"), block=32
    )
    job(tmp_path / "one.pt")
    parallel.launch(2, job, tmp_path / "two.pt")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for family in BUILDERS:
        a, b = one[family], two[family]
        assert a["orders"] == b["orders"], family
        assert a["calls"] == b["calls"] and a["calls"]["paro"] > 0
        differ = (a["masks"] != b["masks"]).float().mean().item()  # bytes of the packed masks
        assert differ <= 0.01, (family, differ)
        assert rel_l2(a["output"], b["output"]) <= 2e-2, family
