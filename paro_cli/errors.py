"""One error path: every problem the user can fix is a ParoError with a one-line message.

The CLI prints `error: <problem> (<fix>)` to stderr and exits 2; anything else is an internal
error (exit 1), whose traceback PARO_DEBUG=1 shows. A quality gate that fails (GateFailed) exits
3, after the measurements are printed.
"""

from __future__ import annotations


class ParoError(Exception):
    """Bad input: names the problem and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem} ({self.fix})" if self.fix else self.problem

    def __reduce__(self):  # pickled whole (a worker process's error, see parallel.launch)
        return type(self), (self.problem, self.fix)


class RecipeError(ParoError):
    """A recipe file or override is malformed."""


class PlanError(ParoError):
    """A plan file is missing, unreadable, or does not fit this run."""


class ModelError(ParoError):
    """A model cannot be found, loaded, or is of an unsupported family."""


class BackendError(ParoError):
    """The requested attention backend cannot run here."""


class GateFailed(Exception):
    """A measurement fell outside a gate the user set (e.g. --min-psnr): not bad input, a verdict."""
