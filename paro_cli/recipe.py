"""Recipes: YAML files that pick model, geometry, sampling, sparsity and precision.

A recipe crosses into the program once: raw YAML plus CLI overrides (dotted keys) are merged,
checked field by field, and frozen into a `Recipe`. Unknown keys and bad values raise a
RecipeError naming the field and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from paro_kernels.formats import PV_FORMATS, QK_FORMATS, is_scaled

from .errors import RecipeError
from .models.loaded import EMBEDDED_MODEL

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

Backend = Literal["auto", "triton", "torch"]
SlotPolicy = Literal["half", "single"]
Allocation = Literal["layer", "global"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class Geometry:
    """Output size in pixels (the transformer's input size when the model has no VAE)."""

    frames: int = 8
    height: int = 32
    width: int = 32


@dataclass(frozen=True)
class Sampling:
    steps: int = 10
    guidance: float = 5.0
    # Guidance of the low-noise expert where a model has two (Wan 2.2 A14B); None: `guidance`.
    guidance_2: float | None = None
    # Flow-matching shift; None: a pipeline keeps its scheduler's, paro's own loop uses 3.
    flow_shift: float | None = None
    negative_prompt: str = ""
    # Text tokens a pipeline encodes each prompt to (its `max_sequence_length`); None: the
    # pipeline's default. It sets the text part of joint attention (CogVideoX, Flux, HunyuanVideo).
    max_sequence_length: int | None = None
    dtype: Dtype = "auto"
    fps: int = 8


@dataclass(frozen=True)
class Calibration:
    prompts: tuple[str, ...] = ("a red circle moving left on a striped background",)
    seeds: tuple[int, ...] = (0,)
    # Steps profiled for the order choice, spread over the schedule; None profiles every step.
    order_steps: int | None = None
    # Orders the choice may pick from (e.g. [FHW]: no reordering); None: every order of the axes.
    orders: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Sparsity:
    density: float = 0.5
    block_size: int = 64
    slots: SlotPolicy = "half"
    dense_first_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    # How the kept blocks are shared out: "layer", each layer at the density (one threshold for
    # its heads); "global", one threshold over every planned layer and head, the same total.
    allocation: Allocation = "layer"


@dataclass(frozen=True)
class Precision:
    qk: str = "bf16"
    pv: str = "bf16"


@dataclass(frozen=True)
class Recipe:
    model: str = EMBEDDED_MODEL
    geometry: Geometry = field(default_factory=Geometry)
    sampling: Sampling = field(default_factory=Sampling)
    calibration: Calibration = field(default_factory=Calibration)
    sparsity: Sparsity = field(default_factory=Sparsity)
    precision: Precision = field(default_factory=Precision)
    backend: Backend = "auto"
    source: str = field(default="<defaults>", compare=False)

    @property
    def quantised(self) -> bool:
        return is_scaled(self.precision.qk) or is_scaled(self.precision.pv)


# Value rules beyond the type: (check, what is allowed).
RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "geometry.frames": (lambda v: v >= 1, "an integer >= 1"),
    "geometry.height": (lambda v: v >= 1, "an integer >= 1"),
    "geometry.width": (lambda v: v >= 1, "an integer >= 1"),
    "sampling.steps": (lambda v: v >= 1, "an integer >= 1"),
    "sampling.guidance": (lambda v: v >= 0, "a number >= 0"),
    "sampling.guidance_2": (lambda v: v is None or v >= 0, "null or a number >= 0"),
    "sampling.flow_shift": (lambda v: v is None or v > 0, "null or a number > 0"),
    "sampling.fps": (lambda v: v >= 1, "an integer >= 1"),
    "sampling.max_sequence_length": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "calibration.prompts": (lambda v: len(v) >= 1, "a non-empty list of strings"),
    "calibration.seeds": (lambda v: len(v) >= 1, "a non-empty list of integers"),
    "calibration.order_steps": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "calibration.orders": (
        lambda v: v is None or (len(v) >= 1 and all(sorted(o) in (sorted("FHW"), sorted("HW")) for o in v)),
        "null or a non-empty list of orders such as FHW or HWF (HW, WH for images)",
    ),
    "sparsity.density": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "sparsity.block_size": (lambda v: v in (16, 32, 64, 128), "one of 16, 32, 64, 128"),
    "sparsity.dense_first_steps": (lambda v: v >= 0, "an integer >= 0"),
    "sparsity.dense_layers": (lambda v: all(i >= 0 for i in v), "a list of layer indices >= 0"),
    "precision.qk": (
        lambda v: v in QK_FORMATS,
        "one of " + ", ".join(QK_FORMATS) + " (int4 is simulated: no speed-up)",
    ),
    "precision.pv": (lambda v: v in PV_FORMATS, "one of " + ", ".join(PV_FORMATS)),
}


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{name} is {value!r}", "allowed: " + ", ".join(map(str, typing.get_args(tp))))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _convert(value, inner, name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{name} must be a list, got {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise RecipeError(f"{name} must be {tp.__name__}, got {value!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{prefix or 'recipe'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise RecipeError(f"unknown recipe key '{where}{unknown[0]}'", "allowed: " + ", ".join(names))
    values = {}
    for key, value in raw.items():
        name = f"{prefix}.{key}" if prefix else key
        value = _convert(value, hints[key], name)
        if name in RULES:
            check, allowed = RULES[name]
            if not check(value):
                raise RecipeError(f"{name} is {value!r}", f"allowed: {allowed}")
        values[key] = value
    return cls(**values)


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe given as a path, or as the name of a shipped one ("tiny" -> recipes/tiny.yaml)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found", "give a YAML path or a name from `paro recipes`")
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise RecipeError(f"no shipped recipe named {name_or_path!r}", "see `paro recipes` for the names")
    return shipped


def shipped_recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe (default: the shipped 'tiny'), apply dotted-key overrides, validate."""
    path = resolve_recipe_path(name_or_path or "tiny")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise RecipeError(f"recipe {path} is not valid YAML: {first}", "fix the file's syntax") from None
    if not isinstance(raw, dict):
        raise RecipeError(
            f"recipe {path} must be a mapping of fields, got {type(raw).__name__}", "see `paro recipes tiny`"
        )
    return recipe_from_fields(raw, overrides, str(path))


def recipe_from_fields(
    raw: dict[str, Any], overrides: dict[str, Any] | None = None, source: str = "<defaults>"
) -> Recipe:
    """A recipe from raw fields (a YAML file's, or a Recipe's as `recipe_as_dict` gives them)
    with dotted-key overrides (None: keep the field), validated; `source` names it in errors."""
    raw = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise RecipeError(f"recipe {source}: {key} must be a mapping, got {node!r}", "see `paro recipes tiny`")
        node[leaf] = value
    try:
        recipe = _build(Recipe, raw, "")
    except RecipeError as exc:
        raise RecipeError(f"recipe {source}: {exc.problem}", exc.fix) from None
    return dataclasses.replace(recipe, source=source)


def recipe_as_dict(recipe: Recipe) -> dict[str, Any]:
    data = dataclasses.asdict(recipe)
    data.pop("source")
    return data
