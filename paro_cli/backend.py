"""Attention backends and the handler that applies a plan during generation.

Backends are a small table of same-signature functions with their constraints declared beside
them, checked once when a plan is loaded. A backend the user asked for never falls back
silently: if it cannot run here, that is a BackendError.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kernels.layout import SequenceLayout
from kernels.orders import head_permutations
from kernels.quant import PV_FORMATS, QK_FORMATS
from kernels.reference import paro_attention_reference

from . import __version__
from .errors import BackendError, PlanError
from .intercept import AttentionInterceptor, DenseFn
from .plan import Plan


def _torch_attention(q, k, v, *, perm, kept, block, layout, qk, pv):
    """The reference itself, computed in float32 (float64 inputs stay float64)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return paro_attention_reference(q, k, v, perm=perm, kept=kept, block=block, layout=layout, qk=qk, pv=pv, compute_dtype=compute)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: Callable[..., torch.Tensor]
    devices: tuple[str, ...]
    qk_formats: tuple[str, ...]
    pv_formats: tuple[str, ...]
    head_dims: tuple[int, ...] | None  # None: any
    note: str

    def check(self, device: torch.device, head_dim: int, qk: str, pv: str) -> None:
        if device.type not in self.devices:
            raise BackendError(f"backend {self.name!r} does not run on {device.type}", "use backend: auto or torch")
        if qk not in self.qk_formats or pv not in self.pv_formats:
            raise BackendError(f"backend {self.name!r} has no QK {qk} / PV {pv} mode", "choose another precision or backend")
        if self.head_dims is not None and head_dim not in self.head_dims:
            raise BackendError(f"backend {self.name!r} does not support head dim {head_dim}", "use backend: torch")


BACKENDS = {
    "torch": AttentionBackend(
        name="torch",
        fn=_torch_attention,
        devices=("cpu", "cuda"),
        qk_formats=QK_FORMATS,
        pv_formats=PV_FORMATS,
        head_dims=None,
        note="plain-torch reference (chunked, exact semantics, slow): the CPU path",
    ),
}


def select_backend(requested: str, device: torch.device, head_dim: int, qk: str, pv: str) -> AttentionBackend:
    """Resolve "auto" and check the backend can serve this run."""
    name = requested
    if requested == "auto":
        name = "triton" if device.type == "cuda" and "triton" in BACKENDS else "torch"
    if name not in BACKENDS:
        raise BackendError(f"backend {name!r} is not available in paro {__version__}", "available: " + ", ".join(BACKENDS))
    backend = BACKENDS[name]
    backend.check(device, head_dim, qk, pv)
    return backend


class PlanAttention:
    """AttentionHandler that runs each self-attention call as the plan says.

    Per forward it picks the timestep slot (by normalised timestep, so a plan survives another
    step count) and whether the step is one of the dense first steps; per call it runs the
    backend with the layer's per-head orders and the slot's kept blocks, or the stock dense
    attention for dense layers and steps.
    """

    def __init__(self, plan: Plan, component: str, backend: AttentionBackend, layout: SequenceLayout,
                 device: torch.device, qk: str, pv: str):
        self.plan = plan
        self.qk, self.pv = qk, pv
        self.comp = plan.components[component]
        self.backend = backend
        self.layout = layout
        self.device = device
        self.perms = torch.stack([head_permutations(orders, plan.grid) for orders in self.comp.orders]).to(device)
        self.dense_layers = set(plan.dense_layers)
        self.slot: int | None = None
        self.kept: torch.Tensor | None = None  # (layers, heads, nb, nb) of the current slot
        self.dense_step = False
        self.calls: Counter[str] = Counter()

    def on_forward(self, grid: tuple[int, int, int], t: float) -> None:
        if tuple(grid) != tuple(self.plan.grid):
            raise PlanError(
                f"plan is for a token grid of {'x'.join(map(str, self.plan.grid))}, the model got {'x'.join(map(str, grid))}",
                "use the plan's geometry or calibrate for this one",
            )
        slot = self.plan.slot_of(t)
        if slot != self.slot:
            self.slot = slot
            self.kept = self.comp.slot_masks(slot).to(self.device)
        self.dense_step = self.plan.dense_above_t is not None and t > self.plan.dense_above_t

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: DenseFn) -> torch.Tensor:
        if self.dense_step or layer in self.dense_layers:
            self.calls["dense"] += 1
            return dense()
        self.calls["paro"] += 1
        return self.backend.fn(
            q, k, v, perm=self.perms[layer], kept=self.kept[layer], block=self.plan.block_size,
            layout=self.layout, qk=self.qk, pv=self.pv,
        )


@contextlib.contextmanager
def use_plan(loaded, plan: Plan, grid: tuple[int, int, int], backend: str, qk: str | None = None, pv: str | None = None) -> Iterator[PlanAttention]:
    """Run `loaded`'s self-attention through `plan` inside the block; stock attention after.

    Checks the plan against the model and geometry and the backend against the device first.
    qk / pv override the plan's precision.
    """
    plan.check_run(family=loaded.family, fingerprints=loaded.fingerprints(), grid=grid, block_size=None)
    qk, pv = qk or plan.qk, pv or plan.pv
    chosen = select_backend(backend, loaded.device, loaded.adapter.head_dim(loaded.transformer), qk, pv)
    handler = PlanAttention(plan, "transformer", chosen, loaded.adapter.sequence_layout(), loaded.device, qk, pv)
    with AttentionInterceptor(loaded.transformer, loaded.adapter, handler):
        yield handler
