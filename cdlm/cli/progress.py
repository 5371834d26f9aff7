"""Rich progress rendering of the library's callbacks, on stderr (stdout carries data only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cdlm.sampling.types import StepInfo

stderr = Console(stderr=True)


@contextmanager
def training(total_steps: int) -> Iterator[Callable[[Mapping[str, Any]], None]]:
    """Yield an ``on_log`` hook that advances a bar to each logged step and shows loss and throughput."""
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=False) as bar:
        task = bar.add_task("train", total=total_steps, stats="")

        def on_log(record: Mapping[str, Any]) -> None:
            stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
            bar.update(task, completed=record["step"], stats=stats)

        yield on_log


@contextmanager
def sampling() -> Iterator[Callable[[StepInfo], None]]:
    """Yield an ``on_step`` hook that shows the current solver step, time and network evaluations."""
    with Progress(TextColumn("[bold]sample"), TextColumn("{task.description}"), console=stderr) as bar:
        task = bar.add_task("", total=None)

        def on_step(info: StepInfo) -> None:
            bar.update(task, description=f"step {info.index + 1}  t={info.t_next:.3f}  nfe {info.nfe}")

        yield on_step
