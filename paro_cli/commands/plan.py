"""`paro plan show`: what a plan file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..options import JsonOpt
from ..output import Output
from ..plan import load_plan

app = typer.Typer(help="Inspect plan files.", no_args_is_help=True)


@app.command("show")
def show(path: Annotated[Path, typer.Argument(help="Plan file.")], as_json: JsonOpt = False) -> None:
    """Print a plan's metadata and, per layer, its heads' orders and densities (--json: per head, per slot)."""
    plan = load_plan(path)
    ui = Output(as_json)
    header = plan.header()
    meta = [[k, v] for k, v in header.items() if k not in ("components", "calibration_timesteps", "candidate_orders")]
    ui.table(f"plan {path}", ["field", "value"], meta)
    for name, comp in plan.components.items():
        ui.table(
            f"{name}: {comp.num_layers} layers x {comp.num_heads} heads, {plan.num_slots} timestep slots, "
            f"{plan.allocation} allocation",
            *plan.layer_table(name),
        )
    ui.json(plan.summary())
