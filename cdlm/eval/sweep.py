"""Steps versus quality: one row per solver-step count (steps, NFE, Gen PPL, entropy, seconds), CSV and a plot."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

CSV_FILE, PNG_FILE = "sweep.csv", "sweep.png"


@dataclass(frozen=True)
class SweepRow:
    """One steps setting: its network evaluations, Gen PPL and entropy (None when not computed), wall seconds."""

    steps: int
    nfe: int
    gen_ppl: float | None
    entropy: float | None
    seconds: float


def rows(results: Sequence[Mapping[str, Any]]) -> list[SweepRow]:
    """Return the sweep rows of ``metrics.json``'s ``results`` entries."""
    return [
        SweepRow(r["steps"], r["nfe"], r["metrics"].get("gen_ppl"), r["metrics"].get("entropy"), r["seconds"])
        for r in results
    ]


def _cell(value: float | int | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table(sweep_rows: Sequence[SweepRow]) -> str:
    """Return the rows as an aligned text table with a header."""
    header = [f.name for f in fields(SweepRow)]
    cells = [header, *([_cell(v) for v in astuple(r)] for r in sweep_rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def write_csv(sweep_rows: Sequence[SweepRow], path: Path) -> None:
    """Write the rows as CSV (header ``steps,nfe,gen_ppl,entropy,seconds``; empty cells for missing metrics)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([f.name for f in fields(SweepRow)])
        writer.writerows([_cell(v) for v in astuple(r)] for r in sweep_rows)


def plot(sweep_rows: Sequence[SweepRow], path: Path, title: str = "") -> None:
    """Draw Gen PPL (left axis) and entropy (right axis) against steps, log-2 steps axis, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    steps = [r.steps for r in sweep_rows]
    fig, ppl_ax = plt.subplots(figsize=(6, 4), dpi=100)
    ppl_ax.set_xscale("log", base=2)
    ppl_ax.set_xticks(steps, [str(s) for s in steps])
    ppl_ax.set_xlabel("solver steps")
    if any(r.gen_ppl is not None for r in sweep_rows):
        ppl_ax.plot(steps, [r.gen_ppl for r in sweep_rows], "o-", color="tab:blue", label="Gen PPL")
        ppl_ax.set_ylabel("Gen PPL", color="tab:blue")
    if any(r.entropy is not None for r in sweep_rows):
        ent_ax = ppl_ax.twinx()
        ent_ax.plot(steps, [r.entropy for r in sweep_rows], "s--", color="tab:orange", label="entropy")
        ent_ax.set_ylabel("unigram entropy (nats)", color="tab:orange")
    ppl_ax.set_title(f"steps vs quality {title}".strip())
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
