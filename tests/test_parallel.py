"""Several processes (gloo on the CPU, as NCCL on GPUs): Ulysses context parallelism gives the
same plan and the same output as one process, and bad setups are refused before any work."""

import contextlib
import functools
import json

import pytest
import torch

from paro_cli import parallel
from paro_cli.api import apply
from paro_cli.calibration import calibrate
from paro_cli.compiled import compiled_forwards
from paro_cli.errors import ModelError
from paro_cli.models import adapter_for
from paro_cli.models.base import forward_input
from paro_cli.models.loaded import LoadedModel, token_grid
from paro_cli.models.loading import cast_transformer, resolve_device
from paro_cli.models.planted import (
    PLANTED_BUILDERS,
    PLANTED_FLUX_ORDERS,
    PLANTED_HUNYUAN_CONFIG,
    PLANTED_ORDERS,
    build_planted_cogvideox,
    build_planted_flux,
    build_planted_transformer,
)
from paro_cli.plan import load_plan
from paro_cli.recipe import load_recipe
from paro_cli.runner import sample

from conftest import paro, rel_l2

BUILDERS = PLANTED_BUILDERS  # every family
# 4x8x8 video / 16x16 image tokens; text in self-attention: none (Wan), 8 before the video
# (CogVideoX), 24 before the image (Flux), 24 after the video, 21 of them padding (HunyuanVideo)
VIDEO = {"geometry.frames": 4, "geometry.height": 16, "geometry.width": 16}
INPUTS = {
    "wan": VIDEO,
    "cogvideox": VIDEO,
    "flux": {"geometry.frames": 1, "geometry.height": 32, "geometry.width": 32},
    "hunyuanvideo": VIDEO,
}


def loaded_planted(build, device=torch.device("cpu"), dtype=torch.float32) -> LoadedModel:
    model = build()
    cast_transformer(model, device, dtype)
    adapter = adapter_for(model)
    return LoadedModel("planted", model, adapter, device, dtype, None, adapter.prompt_encoder(model))


def calibrate_and_generate(
    path,
    dtype=torch.float32,
    backend="torch",
    precision=(None, None),
    block=16,
    families=tuple(BUILDERS),
    compiled=False,
) -> None:
    """Each family: sample densely, calibrate at density 0.3 (where the planted orders are the
    known answer), then sample with the plan (compiled: under torch.compile, graph breaks allowed,
    as `paro generate --compile`); rank 0 saves plans, outputs and the tokens its first attention
    layer holds to `path`."""
    if parallel.world_size() > 1 and not torch.cuda.is_available():
        # diffusers places rank r on accelerator r % device_count(), which is 0 on a CPU
        torch.accelerator.device_count = lambda: 1
    results = {}
    for family in families:
        loaded = loaded_planted(BUILDERS[family], resolve_device(), dtype)
        recipe = load_recipe(
            "planted", {"sampling.steps": 3, "sparsity.block_size": block, "sparsity.density": 0.3, **INPUTS[family]}
        )
        grid = token_grid(loaded, recipe)
        parallel.enable_ulysses(loaded, grid)
        tokens = []  # the sequence length each call of the first attention layer holds
        first = loaded.adapter.attention_layers(loaded.transformer)[0].removesuffix(".processor")
        hook = loaded.transformer.get_submodule(first).register_forward_pre_hook(
            lambda m, args, kwargs, seen=tokens: seen.append(forward_input(args, kwargs, "hidden_states", 0).shape[1]),
            with_kwargs=True,
        )
        dense = sample(loaded, recipe, ["a red circle"], [0], decode=False)
        hook.remove()
        plan = calibrate(loaded, recipe)
        compiling = compiled_forwards([loaded.transformer], fullgraph=False) if compiled else contextlib.nullcontext()
        with apply(loaded, plan, backend=backend, qk=precision[0], pv=precision[1], grid=grid) as run, compiling:
            out = sample(loaded, recipe, ["a red circle"], [0], decode=False)
        comp = plan.components["transformer"]
        results[family] = {
            "orders": comp.orders,
            "masks": comp.packed_masks,
            "recall": comp.recall,
            "output": out.cpu(),
            "dense": dense.cpu(),
            "tokens": tokens[0],
            "calls": run.calls,
            "density": comp.achieved_density.mean().item(),
        }
    if parallel.is_primary():
        torch.save(results, path)


def test_two_processes_compiled_give_one_eager_process_output(tmp_path):
    """--compile with --gpus: the plan's sampling compiled after diffusers split the transformer
    (its hooks and all-to-alls, paro's attention inside them), on 2 processes, against one eager
    process (Wan; compiling on 2 CPU cores takes most of a minute)."""
    job = functools.partial(calibrate_and_generate, families=("wan",))
    job(tmp_path / "one.pt")
    parallel.launch(2, functools.partial(job, compiled=True), tmp_path / "two.pt", device_type="cpu")
    a, b = torch.load(tmp_path / "one.pt")["wan"], torch.load(tmp_path / "two.pt")["wan"]
    assert a["orders"] == b["orders"] and a["calls"] == b["calls"]
    assert rel_l2(a["output"], b["output"]) <= 1e-5


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
        assert b["tokens"] * 2 == a["tokens"], family  # each process's blocks hold half the sequence
        for output in ("dense", "output"):
            assert rel_l2(a[output], b[output]) <= 1e-5, (family, output)
    # and what they agree on is the known answer: the planted orders, sparse masks
    assert one["wan"]["orders"] == [list(o) for o in PLANTED_ORDERS]
    for family in ("cogvideox", "hunyuanvideo"):
        assert one[family]["orders"] == [list(o) for o in PLANTED_ORDERS], family
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
    parallel.check_ulysses(loaded_planted(build_planted_cogvideox), 2, (4, 8, 8), 8)  # paro's plan
    with pytest.raises(ModelError, match=r"diffusers has no context-parallel plan for Module \(wan\)"):
        wan.adapter.context_parallel_plan(torch.nn.Module())  # a class without diffusers' `_cp_plan`


def token_replace_hunyuanvideo_folder(folder):
    """A HunyuanVideo image-to-video transformer with token replacement, its config alone (no weights)."""
    from diffusers import HunyuanVideoTransformer3DModel

    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**PLANTED_HUNYUAN_CONFIG, image_condition_type="token_replace")
    model.save_config(folder)
    return folder


def launched_by_torchrun(monkeypatch, rank: int, processes: int) -> None:
    for name, value in dict(RANK=rank, WORLD_SIZE=processes, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("MASTER_PORT", "1")  # never reached: the refusals come before the group is joined


@pytest.mark.parametrize(
    "model,processes,message",
    [
        ("planted", 4, "transformer has 2 attention heads, which 4 GPUs cannot share evenly"),
        ("architecture:cogvideox-5b", 4, "226 text tokens cannot be split evenly over 4 GPUs"),
        ("TOKEN_REPLACE", 2, "HunyuanVideo with token replacement (image-to-video) treats the first frame's tokens"),
    ],
)
def test_what_cannot_be_split_is_refused_before_weights_load(capsys, monkeypatch, tmp_path, model, processes, message):
    """From the config alone (the token-replacement folder has no weights to load), in every
    process torchrun started, before it joins the group: one line and exit 2 from each (torchrun
    stops the others when the first exits: each must say why), nothing written."""
    if model == "TOKEN_REPLACE":
        model = token_replace_hunyuanvideo_folder(tmp_path / "model")
    args = ["calibrate", "--model", model, "--frames", "4", "--height", "16", "--width", "16"]
    args += ["--out", tmp_path / "p.safetensors"]
    for rank in range(2):
        launched_by_torchrun(monkeypatch, rank, processes)
        code, out, err = paro(capsys, *args)
        assert code == 2 and out == "" and not (tmp_path / "p.safetensors").exists()
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_gpus_under_torchrun_are_torchruns(capsys, monkeypatch, tmp_path):
    launched_by_torchrun(monkeypatch, 0, 2)
    assert parallel.processes(1) == parallel.processes(2) == 2
    code, _, err = paro(capsys, "calibrate", "--gpus", "3", "--out", tmp_path / "p.safetensors")
    assert code == 2 and err == (
        "error: --gpus 3 under torchrun, which started 2 processes (one GPU each) (leave --gpus out or pass --gpus 2)\n"
    )


def test_torchrun_launch_gives_one_process_plan_and_rank_0_alone_prints(capsys, tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on the CPU) runs paro calibrate in its two processes,
    which join torchrun's group: the plan rank 0 writes is the one process's plan, and stdout
    holds rank 0's JSON alone."""
    import subprocess
    import sys

    args = ["calibrate", "--recipe", "planted", "--steps", "2", "--frames", "4", "--height", "16", "--width", "16"]
    args += ["--block-size", "16", "--json"]
    assert paro(capsys, *args, "--out", tmp_path / "one.safetensors")[0] == 0
    script = tmp_path / "paro_on_cpu.py"  # diffusers places rank r on accelerator r % device_count(), 0 on a CPU
    script.write_text(
        "import sys, torch\ntorch.accelerator.device_count = lambda: 1\n"
        "from paro_cli.cli import main\nmain(sys.argv[1:])\n"
    )
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    done = subprocess.run(
        [*launch, *args, "--out", tmp_path / "two.safetensors"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["gpus"] == 2  # one JSON document: rank 0's
    one, two = (load_plan(tmp_path / f"{n}.safetensors").components["transformer"] for n in ("one", "two"))
    assert one.orders == two.orders == [list(o) for o in PLANTED_ORDERS]
    assert torch.equal(one.packed_masks, two.packed_masks)


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
