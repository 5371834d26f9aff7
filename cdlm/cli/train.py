"""``cdlm train``: train a recipe, resuming from the latest checkpoint in the output directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import cdlm
from cdlm.cli import progress


def train(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe name (cdlm recipes list) or YAML file")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override, repeatable")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="run directory")] = None,
    stage: Annotated[str | None, typer.Option(help="multi-stage recipes: train only this stage")] = None,
) -> None:
    """Train a recipe; checkpoints go to the output directory, and a rerun resumes from its latest one."""
    config = cdlm.load_recipe(recipe, set_ or [])
    run_dir = output_dir or Path("runs") / Path(recipe).stem
    with progress.training(config.train.steps) as on_log:
        result = cdlm.train(config, run_dir, stage=stage, on_log=on_log)
    loss = result.metrics.get("loss")
    summary = f"step {result.step}" + (f", loss {loss:.4f}" if loss is not None else "")
    progress.stderr.print(f"run directory: {run_dir} ({summary}); sample with: cdlm sample --checkpoint {run_dir}")
