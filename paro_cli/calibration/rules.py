"""Calibration's rules, pure functions of statistics and schedules: which steps are profiled,
which timestep slot each step's masks belong to, where dense steps end, and which order each head
takes. Block selection, the other rule, is masks.select_blocks."""

from __future__ import annotations

import torch

from ..errors import RecipeError

RECALL_TOLERANCE = 0.005  # orders this close to the best recall are tied; incoherence decides


def slot_of_steps(num_steps: int, policy: str) -> list[int]:
    """ "half": the first half of the steps get a slot each, the rest share one; "single": one."""
    if policy == "single":
        return [0] * num_steps
    half = num_steps // 2
    return [min(i, half) for i in range(num_steps)]


def slot_bounds(timesteps: list[float], slots: list[int]) -> list[float]:
    """Normalised timesteps between consecutive slots (descending): slot(t) = #bounds >= t."""
    return [(timesteps[i] + timesteps[i + 1]) / 2 for i in range(len(slots) - 1) if slots[i + 1] != slots[i]]


def dense_above(timesteps: list[float], dense_first_steps: int) -> float | None:
    """Normalised timestep above which attention stays dense (the first N calibrated steps).

    None: no dense steps; -1: every step is dense.
    """
    if dense_first_steps == 0:
        return None
    if dense_first_steps >= len(timesteps):
        return -1.0
    return (timesteps[dense_first_steps - 1] + timesteps[dense_first_steps]) / 2


def profiled_steps(num_steps: int, order_steps: int | None) -> set[int]:
    if order_steps is None or order_steps >= num_steps:
        return set(range(num_steps))
    return {round(i * (num_steps - 1) / max(1, order_steps - 1)) for i in range(order_steps)}


def choose_orders(recall: torch.Tensor, incoherence: torch.Tensor, density: float, quantised: bool) -> torch.Tensor:
    """Index of the chosen candidate per (layer, head) from (layers, heads, candidates) scores.

    Highest recall wins; among candidates within RECALL_TOLERANCE of it, the lowest incoherence.
    At density 1 recall says nothing: with quantisation incoherence alone decides, without it
    the arrival order (candidate 0) is kept.
    """
    if density >= 1.0:
        if not quantised:
            return torch.zeros(recall.shape[:2], dtype=torch.long)
        return incoherence.argmin(dim=-1)
    tied = recall >= recall.amax(dim=-1, keepdim=True) - RECALL_TOLERANCE
    return incoherence.masked_fill(~tied, float("inf")).argmin(dim=-1)


def allowed_orders(requested: tuple[str, ...] | None, names: list[str]) -> list[int]:
    """Indices into `names` (the grid's candidate orders) that calibration.orders allows."""
    if requested is None:
        return list(range(len(names)))
    unknown = [o for o in requested if o not in names]
    if unknown:
        raise RecipeError(
            f"calibration.orders has {unknown[0]!r}, not an order of this grid's axes",
            "use some of " + ", ".join(names),
        )
    return [names.index(o) for o in dict.fromkeys(requested)]
