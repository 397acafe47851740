"""Telling the denoising steps of a sampling run apart inside attention handlers (calibration's
passes, the heat maps' capture), and checking that every forward call has the first one's input."""

from __future__ import annotations

from paro_kernels.layout import SequenceLayout

from .errors import ParoError
from .plan import text_position


def _same_input(expected_grid, expected_layout: SequenceLayout, grid, layout: SequenceLayout) -> None:
    if tuple(grid) != tuple(expected_grid):
        raise ParoError(
            f"token grid changed during calibration ({expected_grid} -> {tuple(grid)})",
            "calibrate one geometry at a time",
        )
    if (layout.text_len, text_position(layout)) != (expected_layout.text_len, text_position(expected_layout)):
        raise ParoError(
            f"text tokens in self-attention changed during calibration ({expected_layout.text_len} -> "
            f"{layout.text_len})",
            "calibrate with one text length (the pipeline's max_sequence_length)",
        )


class StepTracker:
    """The denoising step of each forward call, counted by the sampler's end-of-step callback
    (`step_done`), not told apart by timestep: a pipeline may pass timesteps in bf16, where two
    steps near t = 1 round to one value; and one step may run several forwards (CFG passes).
    Records the normalised timestep of each step it sees (a Wan 2.2 expert sees only its own
    steps), and the token grid and text layout of the first call (later calls must match)."""

    def __init__(self, grid: tuple[int, int, int] | None = None, layout: SequenceLayout | None = None):
        self.timesteps: dict[int, float] = {}
        self.step = 0
        self.grid, self.layout = grid, layout  # each None: the first call's

    def see(self, grid: tuple[int, int, int], layout: SequenceLayout, t: float) -> int:
        self.grid = self.grid or tuple(grid)
        self.layout = self.layout or layout
        _same_input(self.grid, self.layout, grid, layout)
        self.timesteps.setdefault(self.step, t)  # the step's first forward
        return self.step

    def step_done(self) -> None:
        self.step += 1
