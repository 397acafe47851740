"""Loading a model named by a recipe: the embedded demo, a local folder, or a hub id.

- "embedded": the trained demo model (paro_cli/demo/weights, a transformer folder as below).
- "planted": the planted-attention model (models/planted.py), built from config;
  "planted-experts": two of them switched at a timestep boundary, as Wan 2.2's two experts.
- "architecture:NAME": a full-size architecture with random weights (models/architectures.py),
  to time calibration and sampling without weights; its geometry is the transformer's input
  (latent frames, height and width), as for any bare transformer.
- a folder with config.json (a transformer saved alone by `save_pretrained`): built from its
  config, weights loaded strictly from its safetensors; sampled by paro's own loop with the
  offline prompt encoder sized to the model's text_dim.
- a folder with model_index.json, or a hub id: a full diffusers pipeline (needs the
  `pipelines` extra: transformers and accelerate).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import ModelError
from . import ADAPTERS, adapter_for
from .architectures import build_architecture
from .loaded import ARCHITECTURE_PREFIX, EMBEDDED_MODEL, PLANTED_EXPERTS_MODEL, PLANTED_MODEL, LoadedModel

EMBEDDED_WEIGHTS = Path(__file__).resolve().parent.parent / "demo" / "weights"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device() -> torch.device:
    """The current CUDA device (a worker's own GPU under `paro ... --gpus`), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def cast_transformer(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to device and cast to dtype, keeping the modules the class marks as float32-only
    (`_keep_in_fp32_modules`, e.g. Wan's norms and time embedding) as diffusers' loader does."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    model.to(device).eval()
    for name, module in model.named_modules():
        for key, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if keep & set(f"{name}.{key}".split(".")):
                continue
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)


def _from_config(path: Path) -> torch.nn.Module:
    """The transformer a config.json describes, with the weights its class initialises (on the
    default device: the meta device makes none)."""
    import diffusers

    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"{path} is unreadable ({exc})", "point --model at a folder written by save_pretrained"
        ) from None
    class_name = config.get("_class_name", "?")
    if class_name not in ADAPTERS:
        raise ModelError(
            f"{path.parent} holds a {class_name}, which paro does not support",
            "supported: " + ", ".join(sorted(ADAPTERS)),
        )
    return getattr(diffusers, class_name).from_config(config)


def _load_transformer_folder(folder: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    model = _from_config(folder / "config.json")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["diffusion_pytorch_model.safetensors"]
    state = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise ModelError(
                f"{folder} has no weights file {shard}", "save the model with save_pretrained (safetensors)"
            )
        state.update(load_file(str(folder / shard)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"weights in {folder} do not fit its config: {str(exc).splitlines()[0]}", "re-save the model"
        ) from None
    return model


def _load_pipeline(spec: str, dtype: torch.dtype):
    try:
        import accelerate  # noqa: F401  (diffusers needs it for several families' from_pretrained)
        import transformers  # every pipeline's text encoder
    except ImportError as exc:
        if exc.name not in ("accelerate", "transformers"):  # installed, but broken inside
            raise ModelError(
                f"importing {exc.name} for the pipeline failed: {exc}", "repair that package's installation"
            ) from None
        raise ModelError(
            f"loading the diffusers pipeline {spec} needs transformers and accelerate", "pip install 'paro[pipelines]'"
        ) from None
    import diffusers

    diffusers.utils.logging.disable_progress_bar()  # paro draws its own progress (none with --json)
    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # e.g. image processors' notes on torchvision, for every load
    try:
        return diffusers.DiffusionPipeline.from_pretrained(spec, dtype=dtype)
    except OSError as exc:  # what from_pretrained raises for a missing or unreachable id or folder
        raise ModelError(
            f"could not load pipeline {spec}: {str(exc).splitlines()[0]}",
            "check the id/folder (no network: use a local folder)",
        ) from None
    except (ImportError, ValueError) as exc:  # the folder was found: the cause is inside a library, keep it
        raise ModelError(
            f"loading pipeline {spec} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            "the id/folder was found: fix what the message names",
        ) from exc
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def load_model(spec: str, dtype_name: str = "auto", device: torch.device | None = None) -> LoadedModel:
    device = device or resolve_device()
    dtype = resolve_dtype(dtype_name, device)
    experts = {}
    pipeline = None
    if spec == PLANTED_MODEL:
        from .planted import build_planted_transformer

        transformer = build_planted_transformer()
    elif spec == PLANTED_EXPERTS_MODEL:
        from .planted import build_planted_experts

        transformer, expert_2, boundary = build_planted_experts()
        experts = {"transformer_2": expert_2, "boundary_ratio": boundary}
    elif spec.startswith(ARCHITECTURE_PREFIX):
        return build_architecture(spec[len(ARCHITECTURE_PREFIX) :], device, dtype)
    elif spec == EMBEDDED_MODEL:
        transformer = _load_transformer_folder(EMBEDDED_WEIGHTS)
    else:
        path = Path(spec)
        if (path / "model_index.json").is_file() or (not path.exists() and HUB_ID.match(spec)):
            pipeline = _load_pipeline(spec, dtype)
            adapter_for(pipeline.transformer)  # an unsupported family is refused before anything moves
        elif (path / "config.json").is_file():
            transformer = _load_transformer_folder(path)
        elif path.is_dir():
            raise ModelError(
                f"{path} has neither model_index.json nor config.json",
                "point --model at a diffusers pipeline or transformer folder",
            )
        else:
            raise ModelError(
                f"model {spec!r} not found",
                "give 'embedded', 'planted', 'planted-experts', 'architecture:NAME', a local diffusers folder or a "
                "hub id like org/name",
            )
    if pipeline is not None:
        pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)  # paro draws its own (none with --json)
        loaded = from_pipeline(pipeline, spec)
        for model in loaded.components.values():
            cast_transformer(model, device, dtype)
        return loaded
    for model in (transformer, experts.get("transformer_2")):
        if model is not None:
            cast_transformer(model, device, dtype)
    adapter = adapter_for(transformer)
    return LoadedModel(spec, transformer, adapter, device, dtype, None, adapter.prompt_encoder(transformer), **experts)


def load_config_only(spec: str) -> tuple[dict[str, torch.nn.Module], bool] | None:
    """The transformers of the model `spec` names, built from their configs on the meta device (no
    memory, no weights read), by component name, and whether they come in a pipeline: what can be
    checked before loading. None where the config is not at hand (a hub id not in the local cache:
    loading it will tell)."""
    from .planted import PLANTED_CONFIG

    path = Path(spec)
    with torch.device("meta"):
        if spec in (PLANTED_MODEL, PLANTED_EXPERTS_MODEL):
            from diffusers import WanTransformer3DModel

            names = ("transformer", "transformer_2") if spec == PLANTED_EXPERTS_MODEL else ("transformer",)
            return {name: WanTransformer3DModel(**PLANTED_CONFIG) for name in names}, False
        if spec.startswith(ARCHITECTURE_PREFIX):
            return {
                "transformer": build_architecture(spec[len(ARCHITECTURE_PREFIX) :], torch.device("meta")).transformer
            }, False
        if spec == EMBEDDED_MODEL or (path / "config.json").is_file():
            return {
                "transformer": _from_config((EMBEDDED_WEIGHTS if spec == EMBEDDED_MODEL else path) / "config.json")
            }, False
        configs = {name: _pipeline_config(spec, name) for name in ("transformer", "transformer_2")}
        if configs["transformer"] is None:
            return None
        return {name: _from_config(config) for name, config in configs.items() if config is not None}, True


def _pipeline_config(spec: str, component: str) -> Path | None:
    """A pipeline's (folder or cached hub id) `component`/config.json, if at hand."""
    local = Path(spec) / component / "config.json"
    if local.is_file():
        return local
    if Path(spec).exists() or not HUB_ID.match(spec):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, f"{component}/config.json")
    return Path(cached) if isinstance(cached, str) else None


def from_pipeline(pipeline, model_id: str | None = None) -> LoadedModel:
    """A diffusers pipeline object as paro sees it: its transformer(s), where and in which dtype
    they run. The device is the pipeline's execution device, which model CPU offloading keeps
    apart from where the weights rest."""
    transformer = getattr(pipeline, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ModelError(
            f"{type(pipeline).__name__} has no transformer",
            "paro plans transformer pipelines: " + ", ".join(sorted(ADAPTERS)),
        )
    check_uncompiled(transformer, "pipe.transformer")
    adapter = adapter_for(transformer)
    experts = {}
    expert_2 = getattr(pipeline, "transformer_2", None)
    if expert_2 is not None and pipeline.config.get("boundary_ratio") is not None:  # Wan 2.2 A14B
        check_uncompiled(expert_2, "pipe.transformer_2")
        experts = {"transformer_2": expert_2, "boundary_ratio": pipeline.config.boundary_ratio}
    model_id = model_id or pipeline.config.get("_name_or_path") or type(pipeline).__name__
    return LoadedModel(
        model_id, transformer, adapter, pipeline._execution_device, transformer.dtype, pipeline, None, **experts
    )


def from_transformer(transformer: torch.nn.Module, model_id: str | None = None) -> LoadedModel:
    """A bare diffusers transformer (no pipeline): sampled by paro's own loop."""
    check_uncompiled(transformer, "the transformer")
    adapter = adapter_for(transformer)
    device = next(transformer.parameters()).device
    model_id = model_id or transformer.config.get("_name_or_path") or type(transformer).__name__
    return LoadedModel(
        model_id, transformer, adapter, device, transformer.dtype, None, adapter.prompt_encoder(transformer)
    )


def check_uncompiled(transformer: torch.nn.Module, name: str) -> None:
    """A transformer compiled before paro reaches it would keep running the attention traced
    into its graphs; paro installs first, and compiling afterwards compiles paro's kernels in."""
    if isinstance(transformer, torch._dynamo.eval_frame.OptimizedModule):
        raise ModelError(
            f"{name} is already compiled (torch.compile)",
            "apply paro to the uncompiled transformer, then compile it (or pass its _orig_mod)",
        )
