"""``cdlm sample``: generate text from a run directory or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

import cdlm
from cdlm.cli import progress
from cdlm.errors import DataError


def _read_prompts(prompt: list[str] | None, prompts_file: Path | None) -> list[str] | None:
    if prompts_file is None:
        return prompt or None
    if not prompts_file.is_file():
        raise DataError(f"--prompts-file {prompts_file}: no such file")
    texts = list(prompt or [])
    for number, line in enumerate(prompts_file.read_text().splitlines(), 1):
        if line.strip():
            try:
                texts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f'{prompts_file}:{number}: expected a JSON object with a "prompt" string') from None
    if not texts:
        raise DataError(f"--prompts-file {prompts_file}: no prompts in the file")
    return texts


def sample(
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", "-c", help="run directory or checkpoint directory")
    ] = None,
    recipe: Annotated[
        str | None, typer.Option("--recipe", "-r", help="instead of a checkpoint: a recipe that loads released weights")
    ] = None,
    num_samples: Annotated[int | None, typer.Option(help="number of samples (unconditional)")] = None,
    steps: Annotated[int | None, typer.Option(help="solver steps")] = None,
    sampler: Annotated[str | None, typer.Option(help="euler (ode) | heun | sde")] = None,
    cfg: Annotated[float | None, typer.Option("--cfg", "--guidance", help="classifier-free guidance scale")] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="prompt to continue / condition on, repeatable")] = None,
    prompts_file: Annotated[Path | None, typer.Option(help='JSONL file of {"prompt": ...} objects')] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens to generate per prompt")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = argmax")] = None,
    top_k: Annotated[int | None, typer.Option(help="top-k filtering, 0 = off")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus filtering, 1 = off")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="1 = off")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override of the run config")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write JSONL here instead of text")] = None,
) -> None:
    """Generate text from a trained run: JSONL with a "text" field per sample, or plain text on stdout."""
    # Flags are sugar for `--set sample.<field>=<value>`: one code path, validated by the recipe machinery.
    sugar = {
        "num_samples": num_samples,
        "steps": steps,
        "sampler": "euler" if sampler == "ode" else sampler,
        "cfg": cfg,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
    }
    overrides = [*(set_ or []), *(f"sample.{key}={value}" for key, value in sugar.items() if value is not None)]
    prompts = _read_prompts(prompt, prompts_file)
    if (checkpoint is None) == (recipe is None):
        raise DataError("give exactly one of --checkpoint DIR (a trained run) or --recipe NAME (released weights)")
    source = checkpoint if recipe is None else cdlm.load_recipe(recipe, overrides)
    with progress.sampling() as on_step:
        samples = cdlm.sample(source, prompts=prompts, overrides=overrides, on_step=on_step)
    if output is None:
        typer.echo("\n\n".join(s.text for s in samples))
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as f:
        for s in samples:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
    progress.stderr.print(f"wrote {len(samples)} samples to {output}")
