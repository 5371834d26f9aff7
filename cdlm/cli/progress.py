"""Progress rendering of the library's callbacks, on stderr (stdout carries data only).

On a terminal a Rich bar advances with every logged step; without one (nohup, CI, a log file) every log step
is one plain line, so that a log shows progress as it happens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cdlm.sampling.types import StepInfo

stderr = Console(stderr=True)
PLAIN_EVERY_S = 10.0
"""Without a terminal, sampling reports its solver steps at most this often (seconds), then once when done."""


def say(message: str) -> None:
    """Print one line on stderr, never wrapped (commands stay copyable)."""
    stderr.print(message, soft_wrap=True, markup=False, highlight=False)


class TrainingProgress:
    """The ``on_log``, ``on_status`` and ``on_stage`` hooks of :func:`cdlm.train`, rendered on stderr.

    Args:
        total_steps: the run's ``train.steps`` (a stage's own, once ``on_stage`` names it).
        bar: the Rich progress bar on a terminal, or None for plain lines.
    """

    def __init__(self, total_steps: int, bar: Progress | None) -> None:
        self.total, self.bar, self.label = total_steps, bar, "train"
        self.task: TaskID | None = None if bar is None else bar.add_task("train", total=total_steps, stats="")

    def on_stage(self, name: str, steps: int) -> None:
        """Start the bar (or the lines) of stage ``name``, ``steps`` steps long."""
        self.total, self.label = steps, f"train {name}"
        self.on_status(f"stage {name}: {steps} steps")
        if self.bar is not None and self.task is not None:
            self.bar.reset(self.task, total=steps, description=self.label, stats="")

    def on_status(self, message: str) -> None:
        """Show a one-line message above the bar."""
        if self.bar is not None:
            self.bar.console.print(message, soft_wrap=True, markup=False, highlight=False)
        else:
            say(message)

    def on_log(self, record: Mapping[str, Any]) -> None:
        """Advance to a logged step."""
        stats = (
            f"loss {_num(record['loss'], '.4f')}  lr {_num(record['lr'], '.2e')}  {record['tokens_per_s']:.0f} tok/s"
        )
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=record["step"], description=self.label, stats=stats)
        else:
            elapsed = time.strftime("%H:%M:%S", time.gmtime(record.get("elapsed_s", 0.0)))
            say(f"{self.label} step {record['step']}/{self.total}  {stats}  {elapsed}")


def _num(value: Any, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


@contextmanager
def training(total_steps: int) -> Iterator[TrainingProgress]:
    """Yield the hooks that render a training run: a bar on a terminal, one line per log step elsewhere."""
    if not stderr.is_terminal:
        yield TrainingProgress(total_steps, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as bar:
        yield TrainingProgress(total_steps, bar)


@contextmanager
def sampling() -> Iterator[Callable[[StepInfo], None]]:
    """Yield an ``on_step`` hook: a live line on a terminal; elsewhere a plain line every :data:`PLAIN_EVERY_S`."""
    if not stderr.is_terminal:
        last, total = time.monotonic(), 0

        def plain(info: StepInfo) -> None:
            nonlocal last, total
            total += 1
            if time.monotonic() - last >= PLAIN_EVERY_S:
                last = time.monotonic()
                say(f"sample: {total} solver steps so far")

        yield plain
        say(f"sample: done, {total} solver steps")
        return
    with Progress(TextColumn("[bold]sample"), TextColumn("{task.description}"), console=stderr) as bar:
        task = bar.add_task("", total=None)
        total = 0

        def on_step(info: StepInfo) -> None:
            nonlocal total
            total += 1
            bar.update(task, description=f"step {info.index + 1}  t={info.t_next:.3f}  solver steps so far {total}")

        yield on_step
