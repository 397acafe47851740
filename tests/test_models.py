"""Attention integration: interception is transparent and reversible, plans at density 1 are
exact, loading paths give clear errors."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import Recorder, full_plan, rel_l2, tiny_wan
from paro_cli.api import apply
from paro_cli.backends import select_backend
from paro_cli.plan_attention import PlanAttention
from paro_cli.errors import BackendError, ModelError
from paro_cli.intercept import AttentionInterceptor
from paro_cli.models import adapter_for, config_fingerprint
from paro_cli.models.loading import load_model
from paro_cli.plan import pack_bits

def run(model, x):
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([700.0, 700.0]), encoder_hidden_states=torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)), return_dict=False)[0]


def test_interception_is_transparent_and_reversible():
    model = tiny_wan()
    x = torch.randn(2, 4, 3, 8, 10)
    stock = run(model, x)
    processors = dict(model.attn_processors)
    from diffusers.models.transformers import transformer_wan

    original = transformer_wan.dispatch_attention_fn
    rec = Recorder()
    with AttentionInterceptor(model, adapter_for(model), rec):
        assert torch.equal(run(model, x), stock)
    assert rec.forwards == [((3, 4, 5), 0, 0.7)]
    assert rec.calls == [(0, (2, 60, 2, 12)), (1, (2, 60, 2, 12))]  # attn1 only; attn2 untouched
    assert transformer_wan.dispatch_attention_fn is original
    assert all(model.attn_processors[k] is p for k, p in processors.items())


@pytest.mark.parametrize("orders", [[["FHW", "FHW"], ["FHW", "FHW"]], [["HWF", "WFH"], ["FWH", "WHF"]]])
def test_density_one_plan_equals_stock_model(orders):
    model = tiny_wan()
    x = torch.randn(2, 4, 3, 8, 10)
    stock = run(model, x)
    plan = full_plan(model, (3, 4, 5), orders)
    backend = select_backend("torch", torch.device("cpu"), torch.float32, 12, 16, "fp32", "fp32")
    handler = PlanAttention(plan, "transformer", backend, torch.device("cpu"), "fp32", "fp32")
    with AttentionInterceptor(model, adapter_for(model), handler):
        out = run(model, x)
    assert handler.calls["paro"] == 2
    assert rel_l2(out, stock) <= 1e-5


def test_apply_refuses_other_geometry_and_model(planted_model, planted_calibration):
    _, plan = planted_calibration
    from paro_cli.errors import PlanError

    with pytest.raises(PlanError, match="token grid"):
        with apply(planted_model, plan, backend="auto", grid=(4, 16, 16)):
            pass
    other = load_model("embedded")
    other.transformer.register_to_config(num_layers=3)  # a different config, same class
    with pytest.raises(PlanError, match="another transformer config"):
        with apply(other, plan, backend="auto", grid=plan.grid):
            pass


def test_backend_selection():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert select_backend("auto", cpu, torch.bfloat16, 64, 64, "int8", "fp8").name == "torch"
    assert select_backend("auto", cuda, torch.float32, 64, 64, "int8", "fp8").name == "torch"  # Triton needs 16-bit
    with pytest.raises(BackendError, match="'triton' does not run on cpu"):
        select_backend("triton", cpu, torch.bfloat16, 64, 64, "bf16", "bf16")
    with pytest.raises(BackendError, match="needs a bf16/fp16 model"):
        select_backend("triton", cuda, torch.float32, 64, 64, "int8", "fp8")
    with pytest.raises(BackendError, match="head dim 160"):
        select_backend("triton", cuda, torch.bfloat16, 160, 64, "int8", "fp8")
    with pytest.raises(BackendError, match="no QK fp32"):
        select_backend("triton", cuda, torch.bfloat16, 64, 64, "fp32", "fp8")
    with pytest.raises(BackendError, match="'flash' is not available"):
        select_backend("flash", cpu, torch.bfloat16, 64, 64, "bf16", "bf16")


def test_transformer_folder_loads_strictly(tmp_path):
    model = tiny_wan()
    model.save_pretrained(tmp_path / "wan")
    loaded = load_model(str(tmp_path / "wan"), "float32", torch.device("cpu"))  # compare like with like
    assert loaded.pipeline is None and loaded.prompt_encoder.dim == 16
    assert config_fingerprint(loaded.transformer) == config_fingerprint(model)
    for (name, a), b in zip(model.state_dict().items(), loaded.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    weights = tmp_path / "wan" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state.pop(next(iter(state)))
    save_file(state, str(weights))
    with pytest.raises(ModelError, match="do not fit its config"):
        load_model(str(tmp_path / "wan"), "float32", torch.device("cpu"))


def test_loading_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither model_index.json nor config.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ModelError, match="UNet2DModel.*supported: CogVideoXTransformer3DModel, FluxTransformer2DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel"):
        load_model(str(tmp_path / "unet"))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match=r"needs transformers and accelerate \(pip install 'paro\[pipelines\]'\)"):
            load_model(str(tmp_path / "pipe"))


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_the_name_kernels_is_left_to_hugging_face(cwd, tmp_path):
    """paro's kernels import as `paro_kernels`; `import kernels` (which transformers and
    diffusers do) finds Hugging Face's package whenever it is installed, also from the repo root
    (the working directory is first on sys.path there), and never a module of ours."""
    assert not (REPO / "kernels" / "__init__.py").exists()  # a namespace folder loses to any package
    script = ("import importlib.util, paro_kernels, paro_cli.cli\n"
              "spec = importlib.util.find_spec('kernels')\n"
              "print(paro_kernels.__file__)\n"
              "print(spec.origin if spec and spec.origin else '-')\n"
              "if spec and spec.origin: import kernels, transformers\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO if cwd == "repo" else tmp_path,
                          capture_output=True, text=True, check=True)
    ours, theirs = done.stdout.split()
    assert Path(ours) == REPO / "kernels" / "paro_kernels" / "__init__.py"
    assert theirs == "-" or not Path(theirs).is_relative_to(REPO / "kernels")
    try:
        importlib.metadata.distribution("kernels")  # Hugging Face's: current transformers requires it
    except importlib.metadata.PackageNotFoundError:
        return
    assert theirs != "-"


def test_plan_wiring_uses_each_layers_order_and_each_slots_mask():
    """Sparse random masks, different per slot and layer: every call must equal the reference
    computed with that layer's orders and that timestep slot's mask."""
    from paro_kernels.reference import paro_attention_reference

    model = tiny_wan()
    grid = (3, 4, 5)
    plan = full_plan(model, grid, [["HWF", "WFH"], ["FWH", "WHF"]])
    nb = plan.num_blocks
    g = torch.Generator().manual_seed(5)
    kept = (torch.rand(2, 2, 2, nb, nb, generator=g) < 0.5) | torch.eye(nb, dtype=torch.bool)
    plan.components["transformer"].packed_masks = pack_bits(kept)
    backend = select_backend("torch", torch.device("cpu"), torch.float32, 12, 16, "fp32", "fp32")

    class Recording(PlanAttention):
        def attention(self, layer, q, k, v, dense, layout):
            out = super().attention(layer, q, k, v, dense, layout)
            self.seen.append((self.slot, layer, q, k, v, out))
            return out

    handler = Recording(plan, "transformer", backend, torch.device("cpu"), "fp32", "fp32")
    handler.seen = []
    x = torch.randn(2, 4, 3, 8, 10)
    with AttentionInterceptor(model, adapter_for(model), handler), torch.no_grad():
        for t in (900.0, 100.0):  # slot 0 (t > 0.5), slot 1
            model(hidden_states=x, timestep=torch.tensor([t, t]), encoder_hidden_states=torch.zeros(2, 5, 16), return_dict=False)
    assert [(slot, layer) for slot, layer, *_ in handler.seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    orders = plan.components["transformer"].orders
    from paro_kernels.orders import head_permutations

    for slot, layer, q, k, v, out in handler.seen:
        expect = paro_attention_reference(q, k, v, perm=head_permutations(orders[layer], grid), kept=kept[slot, layer], block=16)
        assert rel_l2(out, expect) <= 1e-5
        other = paro_attention_reference(q, k, v, perm=head_permutations(orders[layer], grid), kept=kept[1 - slot, 1 - layer], block=16)
        assert rel_l2(out, other) > 1e-3  # the masks differ enough for a wiring mistake to show


def test_pipelines_get_the_recipes_flow_shift_where_their_scheduler_has_a_fixed_one():
    from diffusers import (CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

    from paro_cli.runner import with_flow_shift

    wan = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    assert with_flow_shift(wan, 5.0).config.flow_shift == 5.0 and wan.config.flow_shift == 3.0
    hunyuan = FlowMatchEulerDiscreteScheduler(shift=7.0)
    assert with_flow_shift(hunyuan, 5.0).config.shift == 5.0
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)  # shifts by resolution
    assert with_flow_shift(flux, 5.0) is flux
    cogvideox = CogVideoXDDIMScheduler()
    assert with_flow_shift(cogvideox, 5.0) is cogvideox


def test_a_pipeline_that_fails_inside_a_library_keeps_its_cause(tmp_path, monkeypatch):
    """A found folder whose loading fails inside transformers (a dependency error, say) reports that
    error, not the 'check the id/folder' hint a missing id gets."""
    pytest.importorskip("transformers")
    import diffusers

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    cause = "Kernels are not available. Please install a compatible version (0.19.1 <= version < 0.20.0)"

    def broken(*args, **kwargs):
        raise ImportError(cause)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", broken)
    with pytest.raises(ModelError) as error:
        load_model(str(tmp_path / "pipe"))
    assert cause in str(error.value) and "ImportError" in str(error.value) and "check the id/folder" not in str(error.value)

    def missing(*args, **kwargs):
        raise OSError("org/name is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", missing)
    with pytest.raises(ModelError, match="check the id/folder"):
        load_model("org/name")
