"""``cdlm recipes list`` and ``cdlm recipes show``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import cdlm

app = typer.Typer(help="List the named recipes or print one resolved.", no_args_is_help=True)


@app.command("list")
def list_() -> None:
    """List the named recipes with their one-line descriptions."""
    table = Table("recipe", "description", box=None)
    for name, description in cdlm.list_recipes().items():
        table.add_row(name, description)
    Console().print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="recipe name or YAML file")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override, repeatable")] = None,
) -> None:
    """Print the resolved configuration of a recipe as YAML."""
    typer.echo(cdlm.recipes.to_yaml(cdlm.load_recipe(name, set_ or [])), nl=False)
