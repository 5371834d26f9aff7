"""``cdlm train``: train a recipe, resuming from the latest checkpoint in the output directory."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path
from typing import Annotated

import typer

import cdlm
from cdlm.cli import progress


def train(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="recipe name (cdlm recipes list) or YAML file")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE override, repeatable; stages.NAME.KEY=VALUE sets one stage's value"),
    ] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="run directory")] = None,
    stage: Annotated[str | None, typer.Option(help="multi-stage recipes: train only this stage")] = None,
) -> None:
    """Train a recipe; checkpoints go to the output directory, and a rerun resumes from its latest one.

    SIGINT (Ctrl-C) and SIGTERM save a checkpoint of the current step and stop; train.max_minutes does the same
    after a wall-clock limit. Rerun the same command to resume.
    """
    config = cdlm.load_recipe(recipe, set_ or [])
    run_dir = output_dir or Path("runs") / Path(recipe).stem
    with progress.training(config.train.steps) as hooks:
        result = cdlm.train(
            config, run_dir, stage=stage, on_log=hooks.on_log, on_status=hooks.on_status, on_stage=hooks.on_stage
        )
    from cdlm.training.distributed import shutdown  # torch and Accelerate load with the run, not with the CLI

    shutdown()
    loss = result.metrics.get("loss")
    summary = f"step {result.step}" + (f", loss {loss:.4f}" if isinstance(loss, float) else "")
    if result.stopped is None:
        progress.say(f"run directory: {run_dir} ({summary})")
        progress.say(f"sample with: cdlm sample --checkpoint {shlex.quote(str(run_dir))}")
        return
    rerun = ["cdlm", "train", "--recipe", recipe, *(a for s in set_ or [] for a in ("--set", s)), "-o", str(run_dir)]
    if stage is not None:
        rerun += ["--stage", stage]
    progress.say(f"stopped by {result.stopped} at {summary}; checkpoint saved to {result.checkpoint}")
    progress.say(f"resume with: {shlex.join(rerun)}")
    if result.stopped in signal.Signals.__members__:
        raise typer.Exit(128 + signal.Signals[result.stopped].value)
