"""End-to-end benchmark: one full sampling run with stock attention, one with the plan, on the
same prompt, seed and device. Per-step latency is the median over steps (the first excluded as
warm-up when there are several); CUDA work is synchronised at every step boundary."""

from __future__ import annotations

import statistics
import time

import torch

from ..api import apply
from ..runner import decodable, sample
from .metrics import psnr


def _timed_sample(loaded, recipe, prompt, seed, label, progress):
    """(output, per-step seconds) of one sampling run."""
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    marks = []

    def on_step(i):
        sync()
        marks.append(time.perf_counter())
        progress.step(i)

    progress.start(label, recipe.sampling.steps)
    sync()
    start = time.perf_counter()
    out = sample(loaded, recipe, [prompt], [seed], on_step=on_step, decode=decodable(loaded))
    return out, [b - a for a, b in zip([start] + marks[:-1], marks)]


def _median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times[1:] if len(times) > 1 else times)


def run(
    loaded, recipe, plan, plan_path: str, grid, prompt: str, seed: int, qk: str | None, pv: str | None, progress
) -> dict:
    """Dense and plan runs; returns the JSON-ready result."""
    dense_out, dense_steps = _timed_sample(loaded, recipe, prompt, seed, "dense", progress)
    with apply(loaded, plan, backend=recipe.backend, qk=qk, pv=pv, grid=grid) as applied:
        paro_out, paro_steps = _timed_sample(loaded, recipe, prompt, seed, "paro", progress)
    dense_ms, paro_ms = _median_ms(dense_steps), _median_ms(paro_steps)
    rel_l2 = ((paro_out.double() - dense_out.double()).norm() / dense_out.double().norm().clamp_min(1e-12)).item()
    video_psnr = psnr(paro_out, dense_out) if dense_out.dtype == torch.uint8 else None
    return {
        "device": torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu",
        "model": loaded.model_id,
        "plan": plan_path,
        "grid": list(grid),
        "steps": recipe.sampling.steps,
        "backend": applied.backend.name,
        "qk": applied.qk,
        "pv": applied.pv,
        "plan_density": plan.density,
        "dense_ms_per_step": round(dense_ms, 3),
        "paro_ms_per_step": round(paro_ms, 3),
        "speedup": round(dense_ms / paro_ms, 4),
        "output_rel_l2": round(rel_l2, 6),
        "psnr_db": None if video_psnr is None else round(video_psnr, 3),
        "attention_calls": dict(applied.calls),
    }
