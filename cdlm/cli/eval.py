"""``cdlm eval``: sample a model (or read samples) and compute the papers' metrics into OUT/metrics.json."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cdlm.cli import flags as sample_flags
from cdlm.cli import progress
from cdlm.errors import CdlmError, DataError


def _steps(value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        steps = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise DataError(f"--steps {value}: expected comma-separated integers, e.g. 8,16,32,64") from None
    if any(s < 1 for s in steps):
        raise DataError(f"--steps {value}: every value must be at least 1")
    return steps


def eval_(
    checkpoint: Annotated[
        str | None, typer.Option("--checkpoint", "-c", help="run, checkpoint, save_pretrained or released dir, hub id")
    ] = None,
    samples: Annotated[Path | None, typer.Option(help="score this samples JSONL instead of sampling")] = None,
    input_: Annotated[
        Path | None, typer.Option("--input", help="JSONL of source/target rows (conditional) or task rows (--task)")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Cola benchmark task: lambada, mmlu, obqa, hellaswag, …")] = None,
    references: Annotated[Path | None, typer.Option(help="human texts for MAUVE (JSONL text / .txt lines)")] = None,
    metrics: Annotated[
        str | None, typer.Option(help="comma-separated, of gen_ppl,entropy,mauve,bleu,rouge,accuracy")
    ] = None,
    judge: Annotated[str, typer.Option(help="Gen PPL judge: causal LM hub id or local directory")] = "gpt2-large",
    judge_dtype: Annotated[str, typer.Option(help="bf16 (the reference's) or fp32")] = "bf16",
    judge_batch_size: Annotated[int, typer.Option(help="samples per judge forward")] = 16,
    max_length: Annotated[int, typer.Option(help="judge truncation length")] = 1024,
    mauve_encoder: Annotated[str, typer.Option(help="MAUVE feature model (hub id or local directory)")] = "gpt2-large",
    num_samples: Annotated[int | None, typer.Option(help="unconditional samples")] = None,
    steps: Annotated[str | None, typer.Option(help="solver steps; several (8,16,32,64) make a sweep")] = None,
    sampler: Annotated[str | None, typer.Option(help="euler (ode) | heun | sde")] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", "--cfg", help="classifier-free guidance scale")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override of the model's config")] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="where metrics.json goes")] = Path("eval"),
) -> None:
    """Evaluate a model: Gen PPL and entropy, MAUVE, BLEU/ROUGE, or Cola task accuracy, recorded to be rerun."""
    from cdlm.eval import runner, sweep  # imports transformers: only when the command runs

    if judge_dtype not in ("bf16", "fp32"):
        raise DataError(f"--judge-dtype {judge_dtype}: expected bf16 or fp32")
    sugar = {
        "num_samples": num_samples,
        "sampler": "euler" if sampler == "ode" else sampler,
        "guidance": guidance,
        "seed": seed,
    }
    flags = sample_flags.overrides(sugar, typed={"sampler": str(sampler)})
    overrides = [*(set_ or []), *flags]
    opts = runner.EvalOptions(
        output_dir=output_dir,
        checkpoint=checkpoint,
        samples=samples,
        input=input_,
        task=task,
        references=references,
        metrics=tuple(metrics.split(",")) if metrics else None,
        judge=judge,
        judge_dtype=judge_dtype,  # type: ignore[arg-type]
        judge_batch_size=judge_batch_size,
        max_length=max_length,
        mauve_encoder=mauve_encoder,
        steps=_steps(steps),
        overrides=tuple(overrides),
        command=tuple(sys.argv),
    )
    offered = (*sugar, "steps")
    try:
        with progress.sampling() as on_step:
            hooks = runner.Hooks(
                on_step=on_step,
                on_message=lambda m: progress.stderr.print(m),
                on_loaded=lambda config: sample_flags.check_used(config, flags, offered),
            )
            summary = runner.evaluate(opts, hooks)
    except CdlmError as err:
        raise type(err)(sample_flags.in_flag_terms(str(err), flags)) from None
    for entry in summary["results"]:
        typer.echo(
            " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["metrics"].items())
        )
    if len(summary["results"]) > 1:
        typer.echo(sweep.table(sweep.rows(summary["results"])))
    progress.stderr.print(f"wrote {output_dir / runner.METRICS_FILE} and {output_dir / runner.SAMPLES_FILE}")
