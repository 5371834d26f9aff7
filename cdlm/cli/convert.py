"""``cdlm convert``: rewrite a model as a cdlm checkpoint directory, in the Hugging Face layout or a released one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import cdlm
from cdlm.cli import progress


def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="run or checkpoint directory, save_pretrained directory, released checkpoint, or hub id",
            show_default=False,
        ),
    ],
    destination: Annotated[Path, typer.Argument(help="directory to write into", show_default=False)],
    to: Annotated[
        str,
        typer.Option(
            help="cdlm (checkpoint directory: raw + EMA weights), hf (save_pretrained layout with a model card), "
            "or a released format of the source's method: elf-official (elf), cola-official (cola), hf-causal-lm (ar)"
        ),
    ] = "cdlm",
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override of the source's config")] = None,
) -> None:
    """Convert a model between layouts; the result loads with `cdlm sample --checkpoint`."""
    written = cdlm.convert(source, destination, to=to, overrides=set_ or [])
    progress.stderr.print(f"wrote {to} to {written}")
