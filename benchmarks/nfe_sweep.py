"""Quality against network evaluations: solvers (and distilled students) of one ELF model, judged by Gen PPL.

    python benchmarks/nfe_sweep.py --model runs/compare/elf-tiny --judge runs/compare/judge --out runs/nfe

For each solver, ``cdlm eval`` samples the model at the step counts that spend about ``--nfe`` network
evaluations per sample (Heun and midpoint evaluate twice per step, so they take half the steps; ELF's last step
is always one Euler evaluation, and the decoder adds one), and the judge scores the samples; the table and plot
show the NFE each run actually spent. ``--grids`` repeats each solver and student on other time grids (``uniform``,
``logit_normal_quantiles``, ``shifted:3``; ``default`` is the model's own). ``--student
NAME=RUN`` adds a distilled model (``cdlm distill``) sampled at its own steps with its own settings (``--solvers
'' --student … --add`` adds students to an earlier sweep). Writes ``sweep.md``, ``sweep.json`` and ``sweep.png``
under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tiny_comparison import cdlm, plot

EVALS_PER_STEP = {"euler": 1, "sde": 1, "dpm2m": 1, "heun": 2, "midpoint": 2}


def score(name: str, model: Path, steps: list[int], extra: list[str], judge: Path, out: Path, n: int) -> list[dict]:
    """Sample ``model`` (at ``steps``, else at its own) with ``extra`` flags and score it; one row per step count.

    All ``n`` samples go in one batch, so the NFE that ``cdlm eval`` records is the NFE of one sample.
    """
    target = out / name
    args = ["eval", "--checkpoint", str(model), "--num-samples", str(n), "--set", f"sample.batch_size={n}"]
    args += ["--steps", ",".join(map(str, steps))] if steps else []
    cdlm(*args, *extra, "--judge", str(judge), "--judge-dtype", "fp32", "-o", str(target), log=out / "commands.log")
    results = json.loads((target / "metrics.json").read_text(encoding="utf-8"))["results"]
    return [
        {"name": name, "steps": r["steps"], "nfe": r["nfe"], **{k: r["metrics"][k] for k in ("gen_ppl", "entropy")}}
        for r in results
    ]


def grid_flags(grid: str) -> list[str]:
    """``cdlm eval`` flags of a grid spec: default (none), a grid name, or ``shifted:SHIFT``."""
    if grid == "default":
        return []
    name, _, shift = grid.partition(":")
    flags = ["--set", f"sample.grid={name}"]
    return flags + (["--set", f"sample.grid_shift={shift}"] if shift else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the teacher: an ELF or Cola run")
    parser.add_argument("--judge", type=Path, required=True, help="a causal-LM judge directory")
    parser.add_argument("--out", type=Path, default=Path("runs/nfe"))
    parser.add_argument("--nfe", default="4,8,16,32", help="rollout evaluations per sample")
    parser.add_argument("--solvers", default="euler,sde,dpm2m,heun,midpoint")
    parser.add_argument(
        "--grids",
        default="default",
        help="time grids per solver: default (the model's), uniform, logit_normal_quantiles, shifted:SHIFT",
    )
    parser.add_argument("--student", action="append", default=[], help="NAME=RUN of a distilled student")
    parser.add_argument("--num-samples", type=int, default=48)
    parser.add_argument("--add", action="store_true", help="keep the rows of the sweep already in --out")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    budgets = [int(b) for b in args.nfe.split(",")]
    rows: list[dict[str, Any]] = []
    for solver in filter(None, args.solvers.split(",")):
        steps = sorted({max(1, b // EVALS_PER_STEP[solver]) for b in budgets})
        for grid in args.grids.split(","):
            name = solver if grid == "default" else f"{solver}, {grid}"
            flags = ["--sampler", solver, *grid_flags(grid)]
            rows += score(name, args.model, steps, flags, args.judge, out, args.num_samples)
    for student in args.student:
        name, _, run = student.partition("=")
        if not run:
            sys.exit(f"--student {student}: expected NAME=RUN")
        for grid in args.grids.split(","):
            label = name if grid == "default" else f"{name}, {grid}"
            rows += score(label, Path(run), [], grid_flags(grid), args.judge, out, args.num_samples)
    if args.add:  # rows of an earlier sweep in --out, then the ones just scored
        rows = json.loads((out / "sweep.json").read_text(encoding="utf-8")) + rows
    print(write(rows, out))


def write(rows: list[dict[str, Any]], out: Path) -> str:
    """Write ``sweep.md``, ``sweep.json`` and ``sweep.png`` under ``out``; return the Markdown table."""
    lines = ["| sampler | steps | NFE / sample | Gen PPL | entropy |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['name']} | {r['steps']} | {r['nfe']:.0f} | {r['gen_ppl']:,.1f} | {r['entropy']:.3f} |" for r in rows
    ]
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    plot(rows, out / "sweep.png", x="nfe", xlabel="network evaluations per sample (decoder included)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
