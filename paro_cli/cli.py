"""The `paro` command: wires the command modules and maps errors to exit codes.

Exit codes: 0 success, 2 bad input (a ParoError or a usage error), 3 a quality gate failed
(`bench quality --min-psnr/--max-drop`), 1 internal error.
PARO_DEBUG=1 shows the traceback of internal errors.
"""

from __future__ import annotations

import os
import sys

import typer

from .commands import bench, calibrate, generate, plan, recipes
from .errors import GateFailed, ParoError

app = typer.Typer(
    name="paro",
    help="PAROAttention for diffusers video/image transformers: calibrate a plan, generate with it, benchmark it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.command("calibrate")(calibrate.command)
app.command("generate")(generate.command)
app.add_typer(bench.app, name="bench")
app.add_typer(plan.app, name="plan")
app.command("recipes")(recipes.command)


def main(argv: list[str] | None = None) -> None:
    """Entry point. Typer itself exits 0 on success and 2 on usage errors (bad flags)."""
    try:
        app(args=argv)
    except ParoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except GateFailed as exc:
        print(f"gate failed: {exc}", file=sys.stderr)
        sys.exit(3)
    except Exception as exc:  # anything else is our bug
        if os.environ.get("PARO_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set PARO_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
