"""Loading (paro_cli/models/loading.py): transformer folders strictly, pipelines with their errors'
causes, clear errors for what cannot load; and the import name 'kernels' left to Hugging Face."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paro_cli.errors import ModelError
from paro_cli.models import config_fingerprint
from paro_cli.models.loading import load_model

from conftest import tiny_wan


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
    with pytest.raises(
        ModelError,
        match="UNet2DModel.*supported: CogVideoXTransformer3DModel, FluxTransformer2DModel, "
        "HunyuanVideoTransformer3DModel, WanTransformer3DModel",
    ):
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
    script = (
        "import importlib.util, paro_kernels, paro_cli.cli\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(paro_kernels.__file__)\n"
        "print(spec.origin if spec and spec.origin else '-')\n"
        "if spec and spec.origin: import kernels, transformers\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO if cwd == "repo" else tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    ours, theirs = done.stdout.split()
    assert Path(ours) == REPO / "kernels" / "paro_kernels" / "__init__.py"
    assert theirs == "-" or not Path(theirs).is_relative_to(REPO / "kernels")
    try:
        importlib.metadata.distribution("kernels")  # Hugging Face's: current transformers requires it
    except importlib.metadata.PackageNotFoundError:
        return
    assert theirs != "-"


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
    assert (
        cause in str(error.value)
        and "ImportError" in str(error.value)
        and "check the id/folder" not in str(error.value)
    )

    def missing(*args, **kwargs):
        raise OSError("org/name is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", missing)
    with pytest.raises(ModelError, match="check the id/folder"):
        load_model("org/name")
