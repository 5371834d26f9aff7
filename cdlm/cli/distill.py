"""``cdlm distill``: progressive distillation of a teacher into a few-step student, round by round."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from cdlm.cli import progress
from cdlm.curriculum import distill as run_curriculum


def distill(
    teacher: Annotated[str, typer.Option("--teacher", help="teacher run, checkpoint, released directory or hub id")],
    rounds: Annotated[
        int | None, typer.Option(help="rounds, each halving the student's steps (default: the recipe's, or 5)")
    ] = None,
    recipe: Annotated[
        str | None, typer.Option("--recipe", "-r", help="staged distillation recipe (e.g. elf-tiny-pd)")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE override, repeatable; stages.NAME.KEY=VALUE sets one round's value"),
    ] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="directory of the rounds")] = Path(
        "runs/distill"
    ),
) -> None:
    """Distil a teacher: each round halves the student's steps and starts from the previous round's EMA weights.

    Without --recipe the rounds use the teacher's own config, 16 student steps in round 1 (model.distill.steps)
    and 4 teacher sub-steps per student step in round 1 (model.distill.teacher_steps), the product kept per round.
    Rerun the same command to resume.
    """
    with progress.training(1) as hooks:
        result = run_curriculum(
            teacher,
            output_dir,
            rounds=rounds,
            recipe=recipe,
            overrides=set_ or [],
            on_log=hooks.on_log,
            on_status=hooks.on_status,
            on_stage=hooks.on_stage,
        )
    loss = result.metrics.get("loss")
    summary = f"step {result.step}" + (f", loss {loss:.4f}" if isinstance(loss, float) else "")
    where = "stopped by " + result.stopped if result.stopped else "done"
    progress.say(f"{where}: {result.run_dir} ({summary})")
    progress.say(f"sample with: cdlm sample --checkpoint {shlex.quote(str(result.run_dir))}")
