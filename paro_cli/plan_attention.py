"""Applying a plan: the attention handler that runs each self-attention call as the plan says
(PlanAttention), and a plan installed on a model's transformers until it is removed
(AppliedPlan, what the Python API's `apply` returns)."""

from __future__ import annotations

import contextlib

import torch

from paro_kernels.layout import SequenceLayout, kept_block_lists
from paro_kernels.orders import head_permutations

from .backends import AttentionBackend, select_backend
from .intercept import DenseFn, routed
from .parallel import local_heads
from .plan import Plan


class PlanAttention:
    """AttentionHandler that runs each self-attention call as the plan says.

    Per forward it picks the timestep slot (by normalised timestep, so a plan survives another
    step count) and whether the step is one of the dense first steps; per call it runs the
    backend with the layer's per-head orders and the slot's kept blocks, or the stock dense
    attention for dense layers and steps.
    """

    def __init__(
        self,
        plan: Plan,
        component: str,
        backend: AttentionBackend,
        device: torch.device,
        qk: str,
        pv: str,
        heads: slice | None = None,
    ):
        self.component = component
        # The heads this rank's calls hold (parallel.local_heads): all of them on one GPU.
        self.heads = heads or slice(0, plan.components[component].num_heads)
        self.qk, self.pv = qk, pv
        self.backend = backend
        self.device = device
        # Orders and the current slot's masks live in buffers that are refilled in place (when
        # the slot or the plan changes): a compiled graph or a captured CUDA graph keeps reading
        # the same tensors.
        comp = plan.components[component]
        layers, nb, n = comp.num_layers, plan.num_blocks, plan.grid[0] * plan.grid[1] * plan.grid[2]
        heads = len(range(comp.num_heads)[self.heads])
        self.perms = torch.zeros(layers, heads, n, dtype=torch.long, device=device)
        self.kept = torch.zeros(layers, heads, nb, nb, dtype=torch.bool, device=device)
        self.kv_index = torch.zeros(layers, heads, nb, nb, dtype=torch.int32, device=device)
        self.kv_count = torch.zeros(layers, heads, nb, dtype=torch.int32, device=device)
        self.dense_step = False
        self.paro_calls = 0
        self.dense_calls = 0
        self.use(plan)

    def use(self, plan: Plan) -> None:
        """Run `plan` from the next forward on: a plan of the same model, grid and block size
        (e.g. another density), in the same buffers."""
        self.plan = plan
        self.comp = plan.components[self.component]
        self.perms.copy_(torch.stack([head_permutations(orders[self.heads], plan.grid) for orders in self.comp.orders]))
        self.dense_layers = set(plan.dense_layers)
        self.slot: int | None = None  # masks are loaded at the next forward

    @property
    def calls(self) -> dict[str, int]:
        return {name: n for name, n in (("paro", self.paro_calls), ("dense", self.dense_calls)) if n}

    def on_forward(self, grid: tuple[int, int, int], layout: SequenceLayout, t: float) -> None:
        self.plan.check_grid(grid)
        self.plan.check_layout(layout)
        slot = self.plan.slot_of(t)
        if slot != self.slot:
            self.slot = slot
            self.kept.copy_(self.comp.slot_masks(slot, self.heads))
            index, count = kept_block_lists(self.kept)
            self.kv_index.copy_(index)
            self.kv_count.copy_(count)
        self.dense_step = self.plan.dense_above_t is not None and t > self.plan.dense_above_t
        # Counted here, outside a compiled forward: a counter bumped in `attention` is a Python
        # int torch.compile guards on, which would recompile the step at every call.
        dense = self.comp.num_layers if self.dense_step else len(self.dense_layers)
        self.dense_calls += dense
        self.paro_calls += self.comp.num_layers - dense

    def attention(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense: DenseFn, layout: SequenceLayout
    ) -> torch.Tensor:
        if self.dense_step or layer in self.dense_layers:
            return dense()
        return self.backend.fn(
            q,
            k,
            v,
            perm=self.perms[layer],
            kept=self.kept[layer],
            kv_index=self.kv_index[layer],
            kv_count=self.kv_count[layer],
            block=self.plan.block_size,
            layout=layout,
            qk=self.qk,
            pv=self.pv,
        )


def check_plan(loaded, plan: Plan, grid: tuple[int, int, int] | None) -> None:
    """Refuse a plan made for another model or geometry (a PlanError; a grid of None is checked
    at each forward call); its text layout is checked against every forward call, which is where
    the text length shows."""
    plan.check_run(family=loaded.family, fingerprints=loaded.fingerprints(), grid=grid)


class AppliedPlan:
    """A plan running on a model's self-attention (each transformer through its component: Wan
    2.2 has two) from construction until `remove()`, or the end of a `with` block; then every
    processor, call site and module is as it was.

    Checks the plan against the model (family, config fingerprints, and `grid` where the caller
    knows it: each forward's grid and text layout are checked anyway) and the backend against the
    device first. qk / pv override the plan's precision.
    """

    def __init__(
        self,
        loaded,
        plan: Plan,
        backend: str = "auto",
        qk: str | None = None,
        pv: str | None = None,
        grid: tuple[int, int, int] | None = None,
    ):
        check_plan(loaded, plan, grid)
        self.plan = plan
        self.qk, self.pv = qk or plan.qk, pv or plan.pv
        self.backend = select_backend(
            backend,
            loaded.device,
            loaded.dtype,
            loaded.adapter.head_dim(loaded.transformer),
            plan.block_size,
            self.qk,
            self.pv,
        )
        self.handlers = {
            name: PlanAttention(
                plan,
                name,
                self.backend,
                loaded.device,
                self.qk,
                self.pv,
                local_heads(tr, plan.components[name].num_heads),
            )
            for name, tr in loaded.components.items()
        }
        self._installed = contextlib.ExitStack()
        self._installed.enter_context(routed(loaded.components, loaded.adapter, self.handlers, self.backend.fuses))

    @property
    def calls(self) -> dict[str, int]:
        """Self-attention calls run through the plan and dense, over every component."""
        total: dict[str, int] = {}
        for handler in self.handlers.values():
            for kind, n in handler.calls.items():
                total[kind] = total.get(kind, 0) + n
        return total

    def remove(self) -> None:
        """Restore the stock attention (a second call does nothing)."""
        self._installed.close()

    def __enter__(self) -> AppliedPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
