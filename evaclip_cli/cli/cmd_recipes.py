"""``evaclip recipes ls|show|cp``: the shipped recipes."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evaclip_cli.cli.options import Overrides, complete_recipe


def ls():
    """List the shipped recipes with their stage, model and description."""
    from rich.console import Console
    from rich.table import Table

    from evaclip_cli.recipes import RECIPE_DIR, builtin_names, load_recipe

    table = Table(title="evaclip recipes", show_lines=False)
    for col in ("name", "stage", "model", "extends", "description"):
        table.add_column(col, overflow="fold")
    for name in builtin_names():
        loaded = load_recipe(name)
        r = loaded.recipe
        parent = Path(loaded.chain[-2]).stem if len(loaded.chain) > 1 else ""
        table.add_row(name, r.stage, r.model.arch, parent, r.description)
    Console().print(table)
    Console().print(f"[dim]{RECIPE_DIR}[/dim]")


def show(
    recipe: Annotated[str, typer.Argument(help="Shipped recipe name or path to a .toml.",
                                          autocompletion=complete_recipe)],
    overrides: Overrides = None,
):
    """Print a recipe resolved: extends applied, overrides applied, defaults filled in."""
    from evaclip_cli.recipes import load_recipe, recipe_to_toml

    loaded = load_recipe(recipe, overrides or [])
    typer.echo(f"# {' <- '.join(Path(c).name for c in reversed(loaded.chain))}")
    typer.echo(recipe_to_toml(loaded.recipe), nl=False)


def cp(
    recipe: Annotated[str, typer.Argument(help="Shipped recipe name or path.", autocompletion=complete_recipe)],
    dest: Annotated[Path, typer.Argument(help="Destination .toml file or directory.")],
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite DEST if it exists.")] = False,
):
    """Copy a recipe (resolved, standalone) to DEST to start your own."""
    from evaclip_cli.recipes import copy_recipe

    out = copy_recipe(recipe, dest, overrides or [], force=force)
    typer.echo(f"wrote {out}")
