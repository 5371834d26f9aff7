"""Entry point of the ``cdlm`` command: one sub-command per module, errors rendered on stderr."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.text import Text

from cdlm.cli import convert, distill, recipes, sample, train
from cdlm.cli import eval as evaluate
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
app.command("eval")(evaluate.eval_)
app.command("distill")(distill.distill)
app.add_typer(recipes.app, name="recipes")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI on ``argv`` (default: the command line); bad input (a CdlmError) exits 2 with ``error: …``."""
    try:
        app(args=argv)
    except CdlmError as err:
        Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
