"""`paro recipes`: list the shipped recipes, or show one."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from ..options import JsonOpt
from ..output import Output
from ..recipe import load_recipe, recipe_as_dict, resolve_recipe_path, shipped_recipes


def command(
    name: Annotated[str | None, typer.Argument(help="A recipe to show in full (name or path).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the shipped recipes; with NAME, print that recipe with every default filled in."""
    ui = Output(as_json)
    if name is not None:
        recipe = load_recipe(name)
        data = recipe_as_dict(recipe)
        ui.print(f"# {resolve_recipe_path(name)}")
        ui.print(yaml.safe_dump(data, sort_keys=False), markup=False)
        ui.json(data)
        return
    rows, data = [], {}
    for path in shipped_recipes():
        r = load_recipe(str(path))
        g = r.geometry
        rows.append(
            [
                path.stem,
                r.model,
                f"{g.frames}x{g.height}x{g.width}",
                r.sampling.steps,
                r.sparsity.density,
                f"{r.precision.qk}/{r.precision.pv}",
                r.backend,
            ]
        )
        data[path.stem] = recipe_as_dict(r)
    ui.table("shipped recipes", ["name", "model", "frames x h x w", "steps", "density", "QK/PV", "backend"], rows)
    ui.json(data)
