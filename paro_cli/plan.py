"""Plan files: what calibration found, in one self-describing safetensors file.

Tensors (per component, e.g. "transformer"; Wan 2.2 holds two):
  {c}.masks             uint8 (slots, layers, heads, ceil(nb*nb/8)): kept blocks, bit-packed
                        row-major over (query block, key block), most significant bit first
  {c}.target_density    float32 (slots, layers, heads)
  {c}.achieved_density  float32 (slots, layers, heads)
                        where "slots" are the component's `slots_run` (header) when it lists
                        them (one of two experts: the slots it runs; the others run dense)
  {c}.recall            float32 (layers, heads, candidates): mass recall of each candidate order
                        (NaN for orders calibration.orders left out, and nothing to choose)
  {c}.incoherence       float32 (layers, heads, candidates)
The header (safetensors metadata key "paro", JSON) holds everything else: versions, model,
grid, text layout, block size, orders per (layer, head) by name, the slot map (and per
component the slots it runs, when it is one of two experts), precision and the calibration
inputs. Plans are checked against the run they are used for; a mismatch is a
PlanError, never a silent fallback.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from paro_kernels.layout import SequenceLayout, num_blocks
from paro_kernels.orders import candidate_orders

from . import __version__
from .errors import PlanError
from .fileio import atomic_path

FORMAT_VERSION = 1
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (..., a, b) -> uint8 (..., ceil(a*b/8))."""
    flat = mask.flatten(-2).to(torch.uint8)
    pad = -flat.shape[-1] % 8
    flat = torch.nn.functional.pad(flat, (0, pad))
    return (flat.unflatten(-1, (-1, 8)) * _BIT_WEIGHTS.to(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """uint8 (..., nbytes) -> bool (..., *shape)."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)).ne(0).flatten(-2)
    return bits[..., : shape[0] * shape[1]].unflatten(-1, shape)


@dataclass
class ComponentPlan:
    """The plan of one transformer: one order per (layer, head), masks per (slot, layer, head)."""

    config_fingerprint: str
    orders: list[list[str]]  # [layer][head], names outermost -> innermost
    packed_masks: torch.Tensor  # uint8 (stored slots, layers, heads, ceil(nb*nb/8)), see pack_bits
    num_blocks: int
    target_density: torch.Tensor  # (stored slots, layers, heads)
    achieved_density: torch.Tensor  # (stored slots, layers, heads)
    recall: torch.Tensor  # (layers, heads, candidates)
    incoherence: torch.Tensor  # (layers, heads, candidates)
    # The timestep slots this transformer runs, whose masks are stored (a Wan 2.2 expert: its
    # side of the boundary); it runs any other slot dense. None: every slot, all stored.
    slots_run: list[int] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.orders)

    def slot_masks(self, slot: int, heads: slice = slice(None)) -> torch.Tensor:
        """Kept blocks of one timestep slot: bool (layers, heads, nb, nb), of the heads `heads`."""
        if self.slots_run is not None:
            if slot not in self.slots_run:
                count = len(range(self.num_heads)[heads])
                return torch.ones(self.num_layers, count, self.num_blocks, self.num_blocks, dtype=torch.bool)
            slot = self.slots_run.index(slot)
        return unpack_bits(self.packed_masks[slot][:, heads], (self.num_blocks, self.num_blocks))

    @property
    def run_density(self) -> torch.Tensor:
        """Kept share (slots, layers, heads) of the slots it runs (dense where it ran none)."""
        return self.achieved_density if len(self.achieved_density) else torch.ones(1, *self.achieved_density.shape[1:])

    @property
    def num_heads(self) -> int:
        return len(self.orders[0]) if self.orders else 0

    @classmethod
    def from_masks(
        cls, config_fingerprint: str, orders: list[list[str]], masks: torch.Tensor, density: float, candidates: int
    ) -> ComponentPlan:
        """A component from bool masks (slots, layers, heads, nb, nb) at target `density`, with no
        calibration scores (recall 1, incoherence 0 for each of the grid's `candidates` orders)."""
        achieved = masks.float().mean(dim=(-1, -2))
        layers, heads = achieved.shape[1:]
        return cls(
            config_fingerprint=config_fingerprint,
            orders=orders,
            packed_masks=pack_bits(masks),
            num_blocks=masks.shape[-1],
            target_density=torch.full_like(achieved, density),
            achieved_density=achieved,
            recall=torch.ones(layers, heads, candidates),
            incoherence=torch.zeros(layers, heads, candidates),
        )


@dataclass
class Plan:
    model_id: str
    family: str
    grid: tuple[int, int, int]  # (F', H', W') visual tokens
    text_tokens: int  # text tokens inside self-attention
    text_position: str  # "none" | "prefix" | "suffix"
    block_size: int
    density: float
    slot_policy: str
    slot_bounds: list[float]  # descending normalised timesteps: slot = #bounds above t
    calibration_timesteps: list[float]  # normalised timestep of each calibrated step
    dense_above_t: float | None  # run dense (stock) attention while t > this; None: never
    dense_layers: list[int]
    qk: str
    pv: str
    prompts: list[str]
    seeds: list[int]
    components: dict[str, ComponentPlan]
    allocation: str = "layer"  # how calibration shared the kept blocks out (recipe sparsity.allocation)
    tool_version: str = __version__
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return len(self.slot_bounds) + 1

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.grid[0] * self.grid[1] * self.grid[2], self.block_size)

    def slot_of(self, t: float) -> int:
        return sum(1 for b in self.slot_bounds if b >= t)

    def header(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "components"}
        data["grid"] = list(self.grid)
        data["candidate_orders"] = candidate_orders(self.grid)
        data["components"] = {
            name: {
                "config_fingerprint": c.config_fingerprint,
                "layers": c.num_layers,
                "heads": c.num_heads,
                "orders": c.orders,
                "slots_run": c.slots_run,
            }
            for name, c in self.components.items()
        }
        return data

    def summary(self) -> dict[str, Any]:
        """All metadata plus, per layer and head, its order and density per slot."""
        data = self.header()
        for name, comp in self.components.items():
            layers = []
            for li, orders in enumerate(comp.orders):
                heads = [
                    {
                        "head": hi,
                        "order": order,
                        "density": [round(float(d), 4) for d in comp.achieved_density[:, li, hi]],
                    }
                    for hi, order in enumerate(orders)
                ]
                layers.append({"layer": li, "dense": li in self.dense_layers, "heads": heads})
            data["components"][name]["per_layer"] = layers
            data["components"][name]["mean_density"] = round(float(comp.run_density.mean()), 4)
        return data

    def layer_table(self, name: str) -> tuple[list[str], list[list]]:
        """(columns, rows) summarising one component per layer, for people."""
        comp = self.components[name]
        rows = []
        for layer, orders in enumerate(comp.orders):
            d = comp.run_density[:, layer]
            rows.append(
                [
                    layer,
                    "dense" if layer in self.dense_layers else "sparse",
                    " ".join(f"{o}x{n}" for o, n in Counter(orders).most_common()),
                    f"{d.mean():.3f}",
                    f"{d.min():.3f}",
                    f"{d.max():.3f}",
                ]
            )
        return ["layer", "attention", "orders (heads)", "mean density", "min", "max"], rows

    def save(self, path: str | Path) -> None:
        tensors = {}
        for name, c in self.components.items():
            tensors[f"{name}.masks"] = c.packed_masks.contiguous()
            tensors[f"{name}.target_density"] = c.target_density.float().contiguous()
            tensors[f"{name}.achieved_density"] = c.achieved_density.float().contiguous()
            tensors[f"{name}.recall"] = c.recall.float().contiguous()
            tensors[f"{name}.incoherence"] = c.incoherence.float().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"paro": json.dumps(self.header())})

    # --- checks against a run -------------------------------------------------------------

    def check_run(self, *, family: str, fingerprints: dict[str, str], grid: tuple[int, int, int] | None) -> None:
        """Refuse a plan made for another model or geometry (None: a grid not known yet)."""
        if family != self.family:
            raise PlanError(
                f"plan is for a {self.family} model, this run uses a {family} model", "calibrate a plan for this model"
            )
        extra = [name for name in self.components if name not in fingerprints]
        if extra:
            raise PlanError(
                f"plan has a component {extra[0]!r} this model lacks (it has {', '.join(fingerprints)})",
                "calibrate a plan for this model",
            )
        for name, fp in fingerprints.items():
            if name not in self.components:
                raise PlanError(
                    f"plan has no component {name!r} (it has {', '.join(self.components)})",
                    "calibrate a plan for this model",
                )
            if self.components[name].config_fingerprint != fp:
                raise PlanError(
                    f"plan was calibrated for another {name} config (fingerprint "
                    f"{self.components[name].config_fingerprint}, this model {fp})",
                    "calibrate a plan for this model",
                )
        if grid is not None:
            self.check_grid(grid)

    def check_layout(self, layout: SequenceLayout) -> None:
        """Refuse a run whose self-attention holds other text than the plan's."""
        if (layout.text_len, text_position(layout)) != (self.text_tokens, self.text_position):
            raise PlanError(
                f"plan has {self.text_tokens} text tokens ({self.text_position}) in self-attention, this run has "
                f"{layout.text_len} ({text_position(layout)})",
                "calibrate with this pipeline's text length (e.g. its max_sequence_length)",
            )

    def check_grid(self, grid: tuple[int, int, int]) -> None:
        if tuple(grid) != tuple(self.grid):
            raise PlanError(
                f"plan is for a token grid of {'x'.join(map(str, self.grid))}, this run has {'x'.join(map(str, grid))}",
                "use the plan's geometry or calibrate for this one",
            )


def make_plan(
    *,
    model_id: str,
    family: str,
    grid: tuple[int, int, int],
    layout: SequenceLayout,
    block_size: int,
    density: float,
    qk: str,
    pv: str,
    components: dict[str, ComponentPlan],
    slot_policy: str = "single",
    slot_bounds: list[float] | None = None,
    calibration_timesteps: list[float] | None = None,
    dense_above_t: float | None = None,
    dense_layers: list[int] | None = None,
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    allocation: str = "layer",
) -> Plan:
    """The one way plans are made (calibration, the benchmarks' synthetic plans, tests): the text
    fields from the run's sequence layout, and every component checked to fit the grid, block
    size and timestep slots, so a plan is whole before it is used or saved."""
    slot_bounds = list(slot_bounds or [])
    nb = num_blocks(math.prod(grid), block_size)
    for name, comp in components.items():
        stored = len(comp.slots_run) if comp.slots_run is not None else len(slot_bounds) + 1
        if (
            comp.num_blocks != nb
            or comp.packed_masks.shape[0] != stored
            or comp.packed_masks.shape[-1] != math.ceil(nb * nb / 8)
        ):
            raise ValueError(
                f"component {name} has masks {tuple(comp.packed_masks.shape)} of {comp.num_blocks} blocks, "
                f"the plan {stored} slots of {nb} blocks"
            )
    return Plan(
        model_id=model_id,
        family=family,
        grid=tuple(grid),
        text_tokens=layout.text_len,
        text_position=text_position(layout),
        block_size=block_size,
        density=density,
        slot_policy=slot_policy,
        slot_bounds=slot_bounds,
        calibration_timesteps=list(calibration_timesteps or []),
        dense_above_t=dense_above_t,
        dense_layers=list(dense_layers or []),
        qk=qk,
        pv=pv,
        prompts=list(prompts or []),
        seeds=list(seeds or []),
        components=components,
        allocation=allocation,
    )


def text_position(layout) -> str:
    """How a plan names a sequence layout's text: none, prefix or suffix."""
    if layout.text_len == 0:
        return "none"
    return "prefix" if layout.text_first else "suffix"


def _damaged(path: Path, what: str) -> PlanError:
    return PlanError(f"{path} is damaged: {what}", "re-run `paro calibrate`")


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {path} not found", "run `paro calibrate --out PATH` first")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise PlanError(
            f"{path} is not a readable plan file ({type(exc).__name__})", "re-run `paro calibrate`"
        ) from None
    if "paro" not in meta:
        raise PlanError(f"{path} is a safetensors file but not a paro plan", "pass a file written by `paro calibrate`")
    try:
        header = json.loads(meta["paro"])
        version = header.get("format_version")
    except (json.JSONDecodeError, AttributeError):
        raise _damaged(path, "its header is not JSON") from None
    if version != FORMAT_VERSION:
        raise PlanError(
            f"{path} has plan format {version}, this paro reads {FORMAT_VERSION}", "recalibrate with this version"
        )
    try:
        grid = tuple(int(x) for x in header["grid"])
        nb = num_blocks(math.prod(grid), int(header["block_size"]))
        slots = len(header["slot_bounds"]) + 1
        candidates = len(candidate_orders(grid))
        components = {}
        for name, info in header["components"].items():
            orders = info["orders"]
            layers, heads = len(orders), len(orders[0])
            slots_run = info.get("slots_run")
            if slots_run is not None and (
                sorted(set(slots_run)) != slots_run or any(not 0 <= i < slots for i in slots_run)
            ):
                raise _damaged(path, f"component {name} runs slots {slots_run}, the plan has {slots}")
            stored = slots if slots_run is None else len(slots_run)
            expected = {
                f"{name}.masks": (stored, layers, heads, math.ceil(nb * nb / 8)),
                f"{name}.target_density": (stored, layers, heads),
                f"{name}.achieved_density": (stored, layers, heads),
                f"{name}.recall": (layers, heads, candidates),
                f"{name}.incoherence": (layers, heads, candidates),
            }
            for key, shape in expected.items():
                if key not in tensors:
                    raise _damaged(path, f"tensor {key} is missing")
                if tuple(tensors[key].shape) != shape:
                    raise _damaged(
                        path, f"tensor {key} has shape {tuple(tensors[key].shape)}, its header implies {shape}"
                    )
            components[name] = ComponentPlan(
                config_fingerprint=info["config_fingerprint"],
                orders=orders,
                packed_masks=tensors[f"{name}.masks"],
                num_blocks=nb,
                target_density=tensors[f"{name}.target_density"],
                achieved_density=tensors[f"{name}.achieved_density"],
                recall=tensors[f"{name}.recall"],
                incoherence=tensors[f"{name}.incoherence"],
                slots_run=slots_run,
            )
        fields = {k: v for k, v in header.items() if k not in ("components", "candidate_orders", "grid")}
        return Plan(grid=grid, components=components, **fields)
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise _damaged(path, f"its header is incomplete ({type(exc).__name__}: {exc})") from None
