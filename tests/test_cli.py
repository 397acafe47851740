"""The `paro` command end to end, in-process: outputs, JSON, exit codes, nothing half-written."""

import json
import os

import imageio.v3 as iio
import pytest
import torch

from paro_cli.output import Output

from conftest import paro

FAST = ["--recipe", "planted", "--steps", "3"]  # the planted model: small, and its plans fit it


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory, planted_calibration):
    path = tmp_path_factory.mktemp("plan") / "plan.safetensors"
    planted_calibration[1].save(path)
    return path


def test_calibrate_writes_a_plan_and_reports_json(capsys, tmp_path):
    out = tmp_path / "p.safetensors"
    code, stdout, _ = paro(capsys, "calibrate", *FAST, "--density", "0.2", "--out", out, "--json")
    assert code == 0 and out.is_file()
    data = json.loads(stdout)
    assert data["density"] == 0.2 and data["grid"] == [8, 16, 16] and data["path"] == str(out)
    orders = [[h["order"] for h in layer["heads"]] for layer in data["components"]["transformer"]["per_layer"]]
    assert orders == [["HWF", "WFH"], ["FWH", "WHF"]]


def test_calibrate_table_names_every_column(capsys, tmp_path):
    code, stdout, _ = paro(capsys, "calibrate", *FAST, "--density", "0.3", "--out", tmp_path / "p.safetensors")
    header = next(line for line in stdout.splitlines() if "layer" in line and "orders" in line)
    cells = [c.strip() for c in header.strip("┃│ ").split("┃")]
    assert code == 0 and cells[:2] == ["layer", "attention"] and all(cells)
    assert "sparse" in stdout


def test_plan_show(capsys, plan_file):
    code, stdout, _ = paro(capsys, "plan", "show", plan_file, "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["family"] == "wan" and data["block_size"] == 64
    heads = data["components"]["transformer"]["per_layer"][1]["heads"]
    assert [h["order"] for h in heads] == ["FWH", "WHF"]
    assert all(len(h["density"]) == data["slot_bounds"].__len__() + 1 for h in heads)
    code, stdout, _ = paro(capsys, "plan", "show", plan_file)
    assert code == 0 and "FWHx1" in stdout


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_generate_writes_a_playable_video(capsys, tmp_path, plan_file, suffix):
    out = tmp_path / f"v{suffix}"
    code, stdout, _ = paro(
        capsys,
        "generate",
        "--plan",
        plan_file,
        "--prompt",
        "a blue square moving up",
        "--seed",
        "3",
        *FAST,
        "--out",
        out,
        "--json",
    )
    assert code == 0
    frames = iio.imread(out)
    assert frames.shape == (8, 32, 32, 3)
    data = json.loads(stdout)
    assert data["attention_calls"] == {"paro": 3 * 2}  # 3 steps x 2 layers (CFG batched)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_generate_compiled_equals_eager(capsys, tmp_path, plan_file, monkeypatch):
    """--compile runs the transformer's forward through torch.compile (graph breaks allowed),
    the plan still applied; the hooks outside the graph still pick each step's slot."""
    from torch._dynamo.utils import counters

    real_compile, compiles = torch.compile, []
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: compiles.append(kw) or real_compile(fn, backend="aot_eager", **kw)
    )  # no C++ build on CPU
    args = [
        "generate",
        "--plan",
        plan_file,
        "--qk",
        "int4",
        "--prompt",
        "a blue square moving up",
        "--seed",
        "3",
        *FAST,
        "--json",
    ]
    code, stdout, _ = paro(capsys, *args, "--out", tmp_path / "e.png")
    assert code == 0 and not json.loads(stdout)["compiled"] and not compiles
    counters.clear()
    code, stdout, _ = paro(capsys, *args, "--compile", "--out", tmp_path / "c.png")
    data = json.loads(stdout)
    assert (
        code == 0
        and data["compiled"]
        and compiles == [{"fullgraph": False}]
        and counters["stats"]["unique_graphs"] >= 1
    )
    assert data["attention_calls"] == {"paro": 3 * 2}
    assert (
        paro(capsys, *[a for a in args if a not in (plan_file, "--plan", "--qk", "int4")], "--out", tmp_path / "d.png")[
            0
        ]
        == 0
    )
    eager, compiled, dense = (iio.imread(tmp_path / name).astype(int) for name in ("e.png", "c.png", "d.png"))
    # int4 QK shows the plan in the pixels; compiled, it runs as in eager mode
    assert (eager != dense).mean() > 0.01 and (eager != compiled).mean() <= 0.1 * (eager != dense).mean()


def test_compiled_forwards_are_put_back():
    """Inside the block forward is compiled; after it, a class forward is the class's again and
    an instance-level one (accelerate's offload wrapper sets one) is the same object."""
    from paro_cli.compiled import compiled_forwards

    plain, wrapped = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    own = wrapped.forward = lambda x: x
    with compiled_forwards([plain, wrapped], fullgraph=True):
        assert "forward" in vars(plain) and wrapped.forward is not own
    assert "forward" not in vars(plain) and wrapped.forward is own


def test_generate_without_plan_is_dense(capsys, tmp_path):
    code, stdout, _ = paro(capsys, "generate", *FAST, "--out", tmp_path / "d.png")
    assert code == 0 and "dense attention" in stdout
    assert iio.imread(tmp_path / "d.png").shape == (32, 8 * 32, 3)


def test_bench_e2e_json(capsys, plan_file):
    code, stdout, _ = paro(capsys, "bench", "e2e", "--plan", plan_file, *FAST, "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert data["backend"] == "torch" and data["steps"] == 3  # an fp32/fp32 plan: the reference, on any device
    assert data["dense_ms_per_step"] > 0 and data["paro_ms_per_step"] > 0
    assert data["speedup"] == pytest.approx(data["dense_ms_per_step"] / data["paro_ms_per_step"], rel=1e-2)
    assert data["psnr_db"] > 25  # density 0.3 on planted heads stays close to dense
    code, stdout, _ = paro(capsys, "bench", "e2e", "--plan", plan_file, *FAST)
    assert code == 0 and "speed-up" in stdout


def test_recipes(capsys):
    code, stdout, _ = paro(capsys, "recipes")
    assert code == 0 and "tiny-d20-int8-fp8" in stdout
    code, stdout, _ = paro(capsys, "recipes", "tiny-d50-int8-fp8", "--json")
    assert json.loads(stdout)["sparsity"]["density"] == 0.5


@pytest.mark.parametrize(
    "args,message",
    [
        (["calibrate", "--density", "1.5"], "sparsity.density is 1.5"),
        (["calibrate", "--qk", "int3"], "precision.qk is 'int3'"),
        (["calibrate", "--recipe", "nope"], "no shipped recipe named 'nope'"),
        (["calibrate", "--frames", "7", "--height", "33"], "geometry.height = 33 is not a multiple"),
        (["calibrate", "--model", "/no/such/model"], "not found"),
        (["calibrate", "--out", "OUT/plan.bin"], "must end in .safetensors"),
        (["calibrate", "--out", "OUT/missing/plan.safetensors"], "does not exist"),
        (
            ["generate", "--plan", "OUT/none.safetensors", "--out", "OUT/v.mp4"],
            "plan file OUT/none.safetensors not found",
        ),
        (
            ["generate", "--recipe", "planted", "--plan", "PLAN", "--frames", "4", "--out", "OUT/v.mp4"],
            "token grid of 8x16x16, this run has 4x16x16",
        ),
        (["generate", "--plan", "PLAN", "--out", "OUT/v.mp4"], "plan was calibrated for another transformer config"),
        (["generate", "--out", "OUT/v.avi"], "unknown extension .avi"),
        (
            ["generate", "--recipe", "planted", "--plan", "PLAN", "--backend", "gpu", "--out", "OUT/v.mp4"],
            "backend is 'gpu'",
        ),
        (["bench", "e2e"], "needs a plan"),
        (["bench", "kernel", "--repeats", "0"], "--repeats 0 is not a count of timings"),
        (["bench", "e2e", "--architecture", "wan9"], "unknown architecture 'wan9'"),
        (["generate", "--gpus", "0", "--out", "OUT/v.mp4"], "--gpus 0 is not a number of GPUs"),
        (["calibrate", "--model", "architecture:wan9", "--out", "OUT/p.safetensors"], "unknown architecture 'wan9'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(capsys, tmp_path, plan_file, args, message):
    args = [a.replace("OUT", str(tmp_path)).replace("PLAN", str(plan_file)) for a in args]
    code, stdout, err = paro(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message.replace("OUT", str(tmp_path)) in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton backend runs here")
def test_triton_backend_refused_on_cpu(capsys, tmp_path, plan_file):
    code, _, err = paro(
        capsys,
        "generate",
        "--recipe",
        "planted",
        "--plan",
        plan_file,
        "--backend",
        "triton",
        "--out",
        tmp_path / "v.mp4",
    )
    assert code == 2 and err.startswith("error: backend 'triton' does not run on cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--out", "OUT/v.mp4"],
        ["calibrate", "--out", "OUT/p.safetensors"],
        ["bench", "e2e", "--architecture", "wan2.1-t2v-1.3b"],
    ],
)
def test_more_gpus_than_the_machine_has_is_refused(capsys, tmp_path, command):
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    code, _, err = paro(capsys, *[a.replace("OUT", str(tmp_path)) for a in command], "--gpus", "2")
    assert (
        code == 2
        and err == f"error: --gpus 2 needs 2 CUDA GPUs, this machine has {found} (pass --gpus {found or 1} or fewer)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_calibrate_generate_and_bench(capfd, tmp_path):
    """Rank 0 of the spawned workers prints: its output reaches the terminal's file descriptors."""
    plan = tmp_path / "p.safetensors"
    code, stdout, _ = paro(capfd, "calibrate", *FAST, "--gpus", "2", "--out", plan, "--json")
    assert code == 0 and json.loads(stdout)["gpus"] == 2
    orders = [
        [h["order"] for h in layer["heads"]] for layer in json.loads(stdout)["components"]["transformer"]["per_layer"]
    ]
    assert orders == [["HWF", "WFH"], ["FWH", "WHF"]]
    code, stdout, _ = paro(
        capfd, "generate", *FAST, "--plan", plan, "--gpus", "2", "--out", tmp_path / "v.png", "--json"
    )
    assert code == 0 and json.loads(stdout)["gpus"] == 2 and json.loads(stdout)["attention_calls"]["paro"] > 0
    assert iio.imread(tmp_path / "v.png").shape == (32, 8 * 32, 3)
    code, stdout, _ = paro(capfd, "bench", "e2e", *FAST, "--plan", plan, "--gpus", "2", "--json")
    assert code == 0 and json.loads(stdout)["gpus"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors", "v.png"]


def test_usage_errors_exit_2(capsys):
    code, _, err = paro(capsys, "generate", "--steps", "many")
    assert code == 2 and "--steps" in err
    code, _, _ = paro(capsys, "frobnicate")
    assert code == 2


def test_internal_errors_exit_1(capsys, monkeypatch):
    import paro_cli.commands.recipes as recipes

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(recipes, "shipped_recipes", boom)
    code, _, err = paro(capsys, "recipes")
    assert code == 1 and "internal error: RuntimeError: disk on fire" in err


def test_bare_transformer_folder(capsys, tmp_path):
    """A WanTransformer3DModel saved alone calibrates through the built-in loop; generating a
    video from its latent space (no VAE) is refused before any work."""
    from conftest import tiny_wan

    tiny_wan().save_pretrained(tmp_path / "wan")
    out = tmp_path / "plan.safetensors"
    code, stdout, err = paro(
        capsys,
        "calibrate",
        "--model",
        tmp_path / "wan",
        "--frames",
        "4",
        "--height",
        "16",
        "--width",
        "16",
        "--steps",
        "2",
        "--block-size",
        "16",
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    data = json.loads(stdout)
    assert data["grid"] == [4, 8, 8] and data["components"]["transformer"]["layers"] == 2
    code, _, err = paro(
        capsys,
        "generate",
        "--model",
        tmp_path / "wan",
        "--plan",
        out,
        "--frames",
        "4",
        "--height",
        "16",
        "--width",
        "16",
        "--out",
        tmp_path / "v.mp4",
    )
    assert code == 2 and "no VAE" in err and not (tmp_path / "v.mp4").exists()
    code, _, err = paro(capsys, "generate", "--plan", out, "--out", tmp_path / "v.mp4")
    assert code == 2 and "another transformer config" in err


def test_help_for_every_command(capsys):
    """Every command and subcommand answers --help with its usage line and its own options."""
    expected = {
        (): ["calibrate", "generate", "bench", "plan", "recipes"],
        ("calibrate",): ["--recipe", "--density", "--qk", "--pv", "--image", "--out", "--gpus", "--json"],
        ("generate",): ["--plan", "--prompt", "--seed", "--image", "--compile", "--out", "--json"],
        ("bench",): ["kernel", "e2e", "quality"],
        ("bench", "kernel"): ["--shape", "--density", "--precision", "--block-size", "--repeats", "--json"],
        ("bench", "e2e"): ["--plan", "--architecture", "--density", "--precision", "--compile", "--gpus", "--json"],
        ("bench", "quality"): [
            "--density",
            "--precision",
            "--frames",
            "--height",
            "--width",
            "--image",
            "--heatmaps",
            "--min-psnr",
            "--max-drop",
            "--plan",
            "--json",
        ],
        ("plan",): ["show"],
        ("plan", "show"): ["--json"],
        ("recipes",): ["[name]"],
    }
    for args, words in expected.items():
        code, stdout, _ = paro(capsys, *args, "--help")
        usage = " ".join(
            [*args, "[OPTIONS]", "COMMAND"] if args in ((), ("bench",), ("plan",)) else [*args, "[OPTIONS]"]
        )
        assert code == 0 and "Usage:" in stdout and usage in " ".join(stdout.split()), (args, stdout)
        missing = [w for w in words if w not in stdout]
        assert not missing, (args, missing)


def test_heatmap_layer_out_of_range_is_refused_before_any_work(capsys, tmp_path):
    code, stdout, err = paro(
        capsys, "bench", "quality", *FAST, "--prompts", "1", "--heatmaps", tmp_path / "maps", "--layer", "7", "--json"
    )
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert "--layer 7 / --head 0 is outside the model's 2 layers x 2 heads" in err and not (tmp_path / "maps").exists()


def test_dense_layers_dense_steps_single_slot(capsys, tmp_path):
    """Recipe options that route calls to stock attention reach the plan and the generation."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: planted\nsparsity: {density: 0.3, slots: single, dense_first_steps: 1, dense_layers: [1]}\n"
        "calibration: {order_steps: 2}\nsampling: {steps: 3}\n"
    )
    plan = tmp_path / "p.safetensors"
    code, stdout, err = paro(capsys, "calibrate", "--recipe", recipe, "--out", plan, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["slot_bounds"] == [] and data["dense_layers"] == [1] and data["dense_above_t"] < 1.0
    layers = data["components"]["transformer"]["per_layer"]
    assert layers[1]["dense"] and all(d == 1.0 for h in layers[1]["heads"] for d in h["density"])
    assert all(abs(d - 0.3) < 0.05 for h in layers[0]["heads"] for d in h["density"])
    code, stdout, err = paro(
        capsys, "generate", "--recipe", recipe, "--plan", plan, "--out", tmp_path / "v.gif", "--json"
    )
    assert code == 0, err
    # step 1: both layers dense; steps 2-3: layer 1 dense, layer 0 through the plan
    assert json.loads(stdout)["attention_calls"] == {"paro": 2, "dense": 4}


@pytest.mark.parametrize("text", ["geometry: 5\n", "- a list\n"])
def test_overrides_into_malformed_recipes_exit_2(capsys, tmp_path, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code, _, err = paro(capsys, "calibrate", "--recipe", recipe, "--frames", "4", "--out", tmp_path / "p.safetensors")
    assert code == 2 and "must be a mapping" in err
    assert not (tmp_path / "p.safetensors").exists()


def test_output_that_is_a_folder_exits_2_before_work(capsys, tmp_path):
    (tmp_path / "v.mp4").mkdir()
    code, _, err = paro(capsys, "generate", "--out", tmp_path / "v.mp4")
    assert code == 2 and "is a folder" in err
    (tmp_path / "p.safetensors").mkdir()
    code, _, err = paro(capsys, "calibrate", "--out", tmp_path / "p.safetensors")
    assert code == 2 and "is a folder" in err


def test_outputs_honour_the_umask(capsys, tmp_path, plan_file):
    code, _, _ = paro(capsys, "generate", "--plan", plan_file, *FAST, "--out", tmp_path / "v.gif")
    assert code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "v.gif").stat().st_mode & 0o777 == 0o666 & ~umask


def test_messages_and_tables_are_never_cut_when_piped(capsys):
    ui = Output()
    ui.print("word " * 60)
    assert capsys.readouterr().out.count("\n") == 1  # one line, however long
    ui.table("t", ["variant", "note"], [["no reordering", "x" * 300]])  # one word wider than the table
    out = capsys.readouterr().out
    assert "…" not in out and out.count("x") == 300 and "no reordering" in out
