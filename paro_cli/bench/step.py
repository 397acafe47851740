"""Denoising-step latency of a full-size architecture (random weights): dense against paro plans
at several densities and precisions, eager or compiled, and the share of the step spent in
attention.

Plans here are synthetic: random orders per head and random masks with the density's number of
kept blocks in every row (the work a calibrated plan of that density does; which blocks are
kept does not change the speed). One plan handler serves every density of a precision, its
mask buffers refilled in place, so a compiled step is compiled once per precision.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from paro_kernels.layout import num_blocks
from paro_kernels.orders import candidate_orders

from .. import parallel
from ..backends import select_backend
from ..compiled import compiled_forwards
from ..intercept import AttentionInterceptor, StockAttention, routed
from ..masks import random_kept, uneven_densities
from ..models import config_fingerprint
from ..models.fused_gelu import tanh_gelu_sites
from ..plan import ComponentPlan, Plan, make_plan
from ..plan_attention import PlanAttention


class _NoAttention:
    """Handler whose attention costs (almost) nothing: the step without its attention. It still
    reads q and k: returning v alone, a compiled step would drop the q/k projections, norms and
    RoPE as dead code, and the no-attention step would lack work the attention step has."""

    def on_forward(self, grid, layout, t):
        pass

    def attention(self, layer, q, k, v, dense, layout):
        return v + 0 * (q + k)  # one elementwise pass


def synthetic_plan(
    loaded, grid, layout, density: float, block: int, qk: str, pv: str, seed: int = 0, allocation: str = "layer"
) -> Plan:
    """One timestep slot, random orders, `density` of the blocks kept in every row of every head
    ("layer"), or in every row of a head at that head's share of a global allocation
    (masks.uneven_densities: the same work in all, unevenly spread over heads and layers)."""
    tr, adapter = loaded.transformer, loaded.adapter
    layers, heads = len(adapter.attention_layers(tr)), adapter.num_heads(tr)
    nb = num_blocks(grid[0] * grid[1] * grid[2], block)
    names = candidate_orders(grid)
    g = torch.Generator().manual_seed(seed)
    orders = [[names[i] for i in torch.randint(len(names), (heads,), generator=g).tolist()] for _ in range(layers)]
    shares = (
        torch.full((layers, heads), density)
        if allocation == "layer"
        else uneven_densities((layers, heads), density, nb)
    )
    masks = torch.stack([random_kept(heads, nb, shares[layer], seed=seed + layer) for layer in range(layers)])[None]
    component = ComponentPlan.from_masks(config_fingerprint(tr), orders, masks, density, len(names))
    return make_plan(
        model_id=loaded.model_id,
        family=loaded.family,
        grid=grid,
        layout=layout,
        block_size=block,
        density=density,
        qk=qk,
        pv=pv,
        components={"transformer": component},
        calibration_timesteps=[0.5],
        allocation=allocation,
    )


def _time(step, repeats: int, sync) -> dict:
    """Median and range of `repeats` timings (ms) of step(), after two untimed runs (compilation,
    autotuning); the device is synchronised around each (a step takes a second at full size)."""
    step(), step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return {"ms": statistics.median(times), "ms_range": [min(times), max(times)]}


def _paro_variants(loaded, plans: dict, backends: dict, around=contextlib.nullcontext):
    """Each precision's plans (`plans[(qk, pv)]`, one per density) installed in turn on the
    transformer, through one handler per precision whose buffers are refilled per density (a
    compiled step keeps reading them), inside `around()`: yields each one's row head while it
    runs. The handler holds this rank's heads (parallel.local_heads)."""
    tr, adapter = loaded.transformer, loaded.adapter
    for (qk, pv), chosen in backends.items():
        handler = PlanAttention(
            plans[qk, pv][0],
            "transformer",
            chosen,
            loaded.device,
            qk,
            pv,
            parallel.local_heads(tr, adapter.num_heads(tr)),
        )
        with routed({"transformer": tr}, adapter, {"transformer": handler}, chosen.fuses), around():
            for plan in plans[qk, pv]:
                handler.use(plan)
                yield {"variant": f"paro {chosen.name}", "density": plan.density, "qk": qk, "pv": pv}


def _maybe_compiled(transformer: torch.nn.Module, compiled: bool, fullgraph: bool = True):
    """A fresh compile per variant (each installs other processors and handlers; see compiled_forwards)."""
    return compiled_forwards([transformer], fullgraph=fullgraph) if compiled else contextlib.nullcontext()


def run(
    loaded,
    inputs: dict,
    grid,
    densities: list[float],
    pairs: list[tuple[str, str]],
    block: int,
    compiled: bool,
    repeats: int,
    backend: str,
    report=lambda msg: None,
    allocation: str = "layer",
) -> dict:
    """Rows of ms per step: dense, the step without attention, and paro per (precision, density);
    the synthetic plans share their blocks out by `allocation` (synthetic_plan)."""
    tr, adapter = loaded.transformer, loaded.adapter
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    layout = adapter.sequence_layout((), inputs)

    def step():
        with torch.no_grad():
            tr(**inputs, return_dict=False)

    def maybe_compiled():
        return _maybe_compiled(tr, compiled)

    def timed(label: str, **row) -> dict:
        report(f"timing {label}")
        with maybe_compiled():
            return {"variant": label, **row, **_time(step, repeats, sync)}

    rows = [timed("dense", density=1.0, qk=None, pv=None)]
    with AttentionInterceptor(tr, adapter, _NoAttention()):
        rows.append(timed("no attention", density=None, qk=None, pv=None))
    backends = {
        pair: select_backend(backend, loaded.device, loaded.dtype, adapter.head_dim(tr), block, *pair) for pair in pairs
    }
    # the share of paro's speed-up that is its fusions around attention (AttentionBackend.fuses)
    fused = [
        name
        for name, present in (("norm+RoPE", adapter.norm_rope_processor is not None), ("GELU", tanh_gelu_sites(tr)))
        if present
    ]
    if fused and any(backend.fuses for backend in backends.values()):
        with routed({"transformer": tr}, adapter, {"transformer": StockAttention()}, fuse=True):
            rows.append(timed("dense, fused " + "+".join(fused), density=1.0, qk=None, pv=None))
    plans = {
        pair: [
            synthetic_plan(loaded, grid, layout, density, block, *pair, allocation=allocation) for density in densities
        ]
        for pair in pairs
    }
    for row in _paro_variants(loaded, plans, backends, maybe_compiled):
        report(f"timing paro d={row['density']} {row['qk']}/{row['pv']}")
        rows.append({**row, **_time(step, repeats, sync)})
    dense, rest = rows[0]["ms"], rows[1]["ms"]
    for row in rows:
        row["speedup_vs_dense"] = dense / row["ms"]
    return {
        "device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu",
        "grid": list(grid),
        "text_tokens": layout.text_len,
        "batch": inputs["hidden_states"].shape[0],
        "compiled": compiled,
        "repeats": repeats,
        "block": block,
        "attention_share_dense": 1 - rest / dense,
        "attention_bound_speedup": dense / rest,
        "rows": rows,
    }


def scaling(
    loaded,
    inputs: dict,
    grid,
    densities: list[float],
    pairs: list[tuple[str, str]],
    block: int,
    repeats: int,
    backend: str,
    report=lambda msg: None,
    allocation: str = "layer",
    compiled: bool = False,
) -> dict:
    """Under `parallel.run` with several GPUs: the dense step and paro's per (precision, density),
    each on one GPU (rank 0 alone, the model whole) and then on all of them (Ulysses context
    parallelism), eager or each variant compiled, and how far the output of the split step lies
    from the one-GPU output."""
    tr, adapter = loaded.transformer, loaded.adapter
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    layout = adapter.sequence_layout((), inputs)
    backends = {
        pair: select_backend(backend, loaded.device, loaded.dtype, adapter.head_dim(tr), block, *pair) for pair in pairs
    }
    plans = {
        pair: [
            synthetic_plan(loaded, grid, layout, density, block, *pair, allocation=allocation) for density in densities
        ]
        for pair in pairs
    }

    def output():
        with torch.no_grad():
            return tr(**inputs, return_dict=False)[0]

    # Graph breaks allowed, on one GPU as on several: dynamo cannot trace into the forward of a
    # block that diffusers' context-parallel hooks wrap (functools.update_wrapper's __wrapped__).
    def compiling():
        return _maybe_compiled(tr, compiled, fullgraph=False)

    def measure(gpus: int) -> list[dict]:
        report(f"timing dense on {gpus} GPU(s)")
        with compiling():
            rows = [
                {
                    "variant": "dense",
                    "density": 1.0,
                    "qk": None,
                    "pv": None,
                    **_time(output, repeats, sync),
                    "output": output(),
                }
            ]
        for row in _paro_variants(loaded, plans, backends, compiling):
            report(f"timing paro d={row['density']} {row['qk']}/{row['pv']} on {gpus} GPU(s)")
            rows.append({**row, **_time(output, repeats, sync), "output": output()})
        return rows

    gpus = parallel.world_size()
    parallel.check_ulysses(loaded, gpus, grid, layout.text_len)  # before rank 0's run alone, not after
    single = measure(1) if parallel.is_primary() else None
    torch.distributed.barrier()  # the other ranks wait while rank 0 runs the whole model alone
    parallel.enable_ulysses(loaded, grid)
    rows = measure(gpus)
    if single is not None:
        for row, alone in zip(rows, single):
            a, b = row.pop("output").double(), alone.pop("output").double()
            row.update(
                ms_1gpu=alone["ms"],
                ms_1gpu_range=alone["ms_range"],
                time_vs_1gpu=row["ms"] / alone["ms"],
                output_rel_l2_vs_1gpu=((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
                output_max_abs_vs_1gpu=(a - b).abs().max().item(),
            )
    return {
        "device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu",
        "gpus": gpus,
        "grid": list(grid),
        "text_tokens": layout.text_len,
        "batch": inputs["hidden_states"].shape[0],
        "compiled": compiled,
        "repeats": repeats,
        "block": block,
        "rows": rows,
    }
