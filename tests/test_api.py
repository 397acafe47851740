"""The Python API on pipeline objects a user holds: the README's example runs, a plan applied and
removed leaves the pipeline exactly as it was, refusals are exceptions a program catches, and
what users do to pipelines (model CPU offload, LoRA, torch.compile after apply) works."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the pipelines extra")
import paro  # noqa: E402

from tiny_pipelines import CALL_ARGS, example_image  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
SETTINGS = dict(num_inference_steps=2, density=0.3, block_size=16, qk="fp32", pv="fp32")


def load(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, kind="wan", **extra):
    """One seeded call at the tiny geometry; the output as float64 numpy."""
    out = pipe(
        prompt="a dog running",
        generator=torch.Generator().manual_seed(1),
        output_type="np",
        num_inference_steps=2,
        **{**CALL_ARGS[kind], **extra},
    )
    return np.asarray(out.frames, dtype=np.float64)


@pytest.fixture(scope="module")
def wan(tiny_pipeline):
    """(pipeline, plan) of the tiny Wan 2.2 pipeline: two experts, a component each."""
    pipe = load(tiny_pipeline("wan22"))
    return pipe, paro.calibrate(pipe, ["a cat surfing"], **CALL_ARGS["wan22"], **SETTINGS)


def test_readme_example_runs(tiny_pipeline, tmp_path, monkeypatch):
    """The README's Python API example, on the tiny Wan 2.1 pipeline: the hub id, device, sizes
    and step counts swapped for the tiny ones, every call as written."""
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    for real, tiny in [
        ('"Wan-AI/Wan2.1-T2V-1.3B-Diffusers"', repr(str(tiny_pipeline("wan")))),
        ('.to("cuda")', ""),
        ("dtype=torch.bfloat16", "dtype=torch.float32"),
        ("num_frames=81, height=480, width=832", "num_frames=9, height=64, width=96"),
        ("num_inference_steps=50", "num_inference_steps=2"),
        ("block_size=128", "block_size=16"),
    ]:
        assert real in code
        code = code.replace(real, tiny)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "wan.plan.safetensors").is_file()
    assert scope["plan"].qk == "int8" and scope["plan"].density == 0.2 and scope["plan"].grid == (3, 4, 6)
    assert scope["video"].shape == (9, 64, 96, 3)


def test_apply_then_remove_leaves_the_pipeline_as_it_was(wan):
    from diffusers.models.transformers import transformer_wan

    pipe, plan = wan
    assert sorted(plan.components) == ["transformer", "transformer_2"] and plan.grid == (3, 4, 6)
    processors = {name: dict(tr.attn_processors) for name, tr in (("1", pipe.transformer), ("2", pipe.transformer_2))}
    call_site, hooks = transformer_wan.dispatch_attention_fn, dict(pipe.transformer._forward_pre_hooks)
    dense = run(pipe, "wan22")

    handle = paro.apply(pipe, plan)
    planned = run(pipe, "wan22")
    assert handle.calls["paro"] > 0 and handle.backend.name == "torch"
    assert np.abs(planned - dense).mean() > 1e-3  # the plan runs
    handle.remove()
    handle.remove()  # a second remove does nothing
    assert np.array_equal(run(pipe, "wan22"), dense)
    assert transformer_wan.dispatch_attention_fn is call_site and dict(pipe.transformer._forward_pre_hooks) == hooks
    for name, tr in (("1", pipe.transformer), ("2", pipe.transformer_2)):
        assert all(tr.attn_processors[k] is v for k, v in processors[name].items())

    with paro.apply(pipe, plan) as applied:  # the same as a context manager
        assert np.array_equal(run(pipe, "wan22"), planned)
    assert applied.calls["paro"] > 0 and np.array_equal(run(pipe, "wan22"), dense)


def test_refusals_are_exceptions(wan, tiny_pipeline, planted_calibration):
    pipe, plan = wan
    dense = run(pipe, "wan22")
    with pytest.raises(paro.PlanError, match="token grid of 3x4x6, this run has 3x2x6"):
        with paro.apply(pipe, plan):
            run(pipe, "wan22", height=32)
    assert np.array_equal(run(pipe, "wan22"), dense)  # the failed call left nothing installed
    with paro.apply(pipe, plan), pytest.raises(paro.PlanError, match="already applied to this transformer"):
        paro.apply(pipe, plan)
    with pytest.raises(paro.PlanError, match="plan was calibrated for another transformer config"):
        paro.apply(pipe, planted_calibration[1])
    flux = load(tiny_pipeline("flux"))
    with pytest.raises(paro.PlanError, match="plan is for a wan model, this run uses a flux model"):
        paro.apply(flux, plan)
    with pytest.raises(paro.RecipeError, match="calibrate needs height and width"):
        paro.calibrate(pipe, ["a cat"], num_frames=9)
    with pytest.raises(paro.RecipeError, match="sparsity.density is 1.5"):
        paro.calibrate(pipe, ["a cat"], **{**CALL_ARGS["wan22"], **SETTINGS, "density": 1.5})
    with pytest.raises(TypeError, match="unexpected keyword argument 'desnity'"):
        paro.calibrate(pipe, ["a cat"], desnity=0.2, **CALL_ARGS["wan22"])
    for kwargs, error, match in (
        ({"height": 64}, paro.RecipeError, "sets 'height', which paro sets from the recipe"),
        ({"return_dict": False}, paro.RecipeError, "sets 'return_dict'"),
        ({"image": example_image("wan_i2v")}, paro.ModelError, "WanPipeline takes no 'image'"),
    ):
        with pytest.raises(error, match=match):
            paro.calibrate(pipe, ["a cat"], pipeline_kwargs=kwargs, **CALL_ARGS["wan22"])
    with pytest.raises(paro.RecipeError, match="calibrate needs prompts"):
        paro.calibrate(pipe, None, **CALL_ARGS["wan22"])
    with pytest.raises(paro.ModelError, match="WanImageToVideoPipeline needs 'image'"):
        paro.calibrate(load(tiny_pipeline("wan_i2v")), ["a cat"], **CALL_ARGS["wan_i2v"], **SETTINGS)
    compiled = torch.compile(pipe.transformer)
    original, pipe.transformer = pipe.transformer, compiled
    try:
        with pytest.raises(paro.ModelError, match="already compiled"):
            paro.apply(pipe, plan)
    finally:
        pipe.transformer = original


def test_a_bare_transformer_is_calibrated_in_paros_loop_and_planned():
    """The API on a transformer alone (no pipeline): paro's own sampling loop calibrates it, and
    the plan applies to its forward calls at the calibrated grid."""
    from conftest import run_tiny_wan, tiny_wan

    model = tiny_wan()
    plan = paro.calibrate(model, ["a cat"], num_frames=4, height=16, width=16, **SETTINGS)
    assert plan.family == "wan" and plan.grid == (4, 8, 8) and plan.num_blocks == 16
    x = torch.randn(2, 4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    stock = run_tiny_wan(model, x)
    with paro.apply(model, plan) as applied:
        planned = run_tiny_wan(model, x)
    assert applied.calls["paro"] == 2 and (planned - stock).abs().mean() > 1e-4
    assert torch.equal(run_tiny_wan(model, x), stock)
    with pytest.raises(paro.ModelError, match="a bare transformer takes no pipeline arguments"):
        paro.calibrate(model, ["a cat"], pipeline_kwargs={"image": None}, num_frames=4, height=16, width=16)


def test_image_to_video_pipeline_takes_its_image(tiny_pipeline):
    pipe = load(tiny_pipeline("wan_i2v"))
    image = example_image("wan_i2v")
    plan = paro.calibrate(pipe, ["a cat surfing"], pipeline_kwargs={"image": image}, **CALL_ARGS["wan_i2v"], **SETTINGS)
    dense = run(pipe, "wan_i2v", image=image)
    with paro.apply(pipe, plan) as applied:
        planned = run(pipe, "wan_i2v", image=image)
    assert applied.calls["paro"] > 0 and np.abs(planned - dense).mean() > 1e-3


def test_model_cpu_offload_lora_and_compile_after_apply(tiny_pipeline):
    """What users do to pipelines: offload hooks (here to the CPU itself: the hooks are what
    matters; the GPU test below offloads a CUDA pipeline), a LoRA adapter on the attention
    projections, and torch.compile of the transformer inside the apply block."""
    pipe = load(tiny_pipeline("wan"))
    plan = paro.calibrate(pipe, ["a cat surfing"], **CALL_ARGS["wan"], **SETTINGS)
    with paro.apply(pipe, plan):
        reference = run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    with paro.apply(pipe, plan) as applied:  # to float rounding: the hooks' copies may change the CPU's kernels
        assert np.allclose(run(pipe), reference, rtol=0, atol=1e-6) and applied.calls["paro"] > 0

    peft = pytest.importorskip("peft")
    pipe = load(tiny_pipeline("wan"))
    dense = run(pipe)
    torch.manual_seed(0)
    pipe.transformer.add_adapter(peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    with_lora = run(pipe)
    assert np.abs(with_lora - dense).mean() > 1e-3  # the adapter acts
    with paro.apply(pipe, plan) as applied:  # the config, and so the plan's fingerprint, is the base model's
        lora_planned = run(pipe)
    assert applied.calls["paro"] > 0 and np.abs(lora_planned - with_lora).mean() > 1e-3
    assert np.array_equal(run(pipe), with_lora)

    pipe = load(tiny_pipeline("wan"))
    with paro.apply(pipe, plan):
        pipe.transformer.compile(backend="eager")
        assert np.allclose(run(pipe), reference, atol=1e-5)


@pytest.mark.gpu
def test_cuda_pipeline_through_the_kernels_offloaded_and_compiled(tiny_pipeline):
    """bf16 on the GPU: a plan calibrated there runs through the Triton kernels (INT8 QK, FP8 PV)
    within bf16 noise of the torch reference, gives the same output with model CPU offloading on
    (paro's buffers on the execution device, the weights moved by accelerate's hooks), and under
    torch.compile (inductor) applied after paro."""
    from diffusers import DiffusionPipeline

    def cuda_pipe(offload: bool):
        pipe = DiffusionPipeline.from_pretrained(tiny_pipeline("wan"), dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        pipe.enable_model_cpu_offload() if offload else pipe.to("cuda")
        return pipe

    pipe = cuda_pipe(offload=False)
    plan = paro.calibrate(
        pipe, ["a cat surfing"], **CALL_ARGS["wan"], **{**SETTINGS, "block_size": 32, "qk": "int8", "pv": "fp8"}
    )
    dense = run(pipe)
    with paro.apply(pipe, plan) as applied:
        fast = run(pipe)
    assert applied.backend.name == "triton" and applied.calls["paro"] > 0
    with paro.apply(pipe, plan, backend="torch"):
        reference = run(pipe)
    assert np.abs(fast - reference).mean() < 0.01 < 100 * np.abs(fast - dense).mean()

    offloaded = cuda_pipe(offload=True)
    assert offloaded.transformer.device.type == "cpu" and offloaded._execution_device.type == "cuda"
    with paro.apply(offloaded, plan) as applied:
        assert np.abs(run(offloaded) - fast).max() < 1e-2 and applied.backend.name == "triton"

    with paro.apply(pipe, plan):
        pipe.transformer.compile()
        assert np.abs(run(pipe) - fast).mean() < 0.01
