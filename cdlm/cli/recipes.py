"""``cdlm recipes list`` and ``cdlm recipes show``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

import cdlm
from cdlm.config import SampleConfig

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
    """Print the resolved configuration of a recipe as YAML, its sample settings described in comments."""
    config = cdlm.load_recipe(name, set_ or [])
    raw = cdlm.recipes.raw_config(config)
    keys = list(raw)
    at = keys.index("sample")
    head, tail = ({k: raw[k] for k in part} for part in (keys[:at], keys[at + 1 :]))
    typer.echo(_yaml(head) + _sample_section(config.method, type(config.sample), raw["sample"]) + _yaml(tail), nl=False)


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False) if data else ""


def _scalar(value: object) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=1_000).strip()[1:-1]


def _sample_section(method: str, cls: type[SampleConfig], values: dict[str, Any]) -> str:
    """Render the ``sample:`` section, each setting followed by its description and default as a YAML comment."""
    lines = [f"sample:  # the sample settings of method {method!r} ({cls.__name__}); it takes no others"]
    for name, info in cls.model_fields.items():
        described = f"{info.description}; " if info.description else ""
        setting = f"{name}: {_scalar(values[name])}"
        lines.append(f"  {setting:<28}  # {described}default {_scalar(info.default)}")
    return "\n".join(lines) + "\n"
