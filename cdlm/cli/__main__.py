"""Entry point of the ``cdlm`` command: one sub-command per module, errors rendered on stderr."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.text import Text

from cdlm.cli import convert, recipes, sample, train
from cdlm.errors import CdlmError

app = typer.Typer(
    name="cdlm",
    help="Continuous diffusion language models (ELF, Cola DLM): train, sample, convert, inspect recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("train")(train.train)
app.command("sample")(sample.sample)
app.command("convert")(convert.convert)
app.add_typer(recipes.app, name="recipes")


def main() -> None:
    """Run the CLI; a CdlmError (bad input) prints ``error: …`` and exits with code 2, anything else is a bug."""
    try:
        app()
    except CdlmError as err:
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
