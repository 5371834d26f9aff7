"""``cdlm sample``: generate text from a run directory or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

import cdlm
from cdlm.cli import flags as sample_flags
from cdlm.cli import progress
from cdlm.errors import CdlmError, DataError, OutputError
from cdlm.jsonl import read_records
from cdlm.validation import check_output_file


def _read_prompts(
    prompt: list[str] | None, prompts_file: Path | None
) -> tuple[list[str] | None, list[int | str | None] | None]:
    """Return the prompts (``--prompt`` first, then the file's) and their ids (None when no line has an ``id``).

    A line's text is its ``prompt`` field, or its ``source`` field (a seq2seq condition, as in ``cdlm eval --input``).
    """
    if prompts_file is None:
        return prompt or None, None
    texts = list(prompt or [])
    ids: list[int | str | None] = [None] * len(texts)
    for number, record in read_records(prompts_file, "--prompts-file"):
        text = record.get("prompt", record.get("source"))
        if not isinstance(text, str):
            raise DataError(
                f'--prompts-file {prompts_file}:{number}: expected a JSON object with a "prompt" (or "source") '
                f"string, got {json.dumps(record)[:60]}"
            )
        texts.append(text)
        sample_id = record.get("id")
        if sample_id is not None and (isinstance(sample_id, bool) or not isinstance(sample_id, int | str)):
            raise DataError(
                f'--prompts-file {prompts_file}:{number}: "id" must be an integer or a string, got {sample_id!r}'
            )
        ids.append(sample_id)
    if not texts:
        raise DataError(f"--prompts-file {prompts_file}: no prompts in the file")
    return texts, ids if any(i is not None for i in ids) else None


def sample(
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint",
            "-c",
            help="run or checkpoint directory, save_pretrained directory, released checkpoint "
            "(ELF checkpoint_<N>, Cola hf_models/), or a Hugging Face hub id owner/name[@revision]",
        ),
    ] = None,
    recipe: Annotated[
        str | None, typer.Option("--recipe", "-r", help="instead of a checkpoint: a recipe that loads released weights")
    ] = None,
    num_samples: Annotated[int | None, typer.Option(help="number of samples (unconditional)")] = None,
    steps: Annotated[int | None, typer.Option(help="solver steps")] = None,
    sampler: Annotated[str | None, typer.Option(help="euler (ode) | heun | midpoint | dpm2m | sde")] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", "--cfg", help="classifier-free guidance scale")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "--source", help="prompt to continue / source to condition on, repeatable"),
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            "--prompts-file",
            "--input",
            help='JSONL of {"prompt" or "source": ..., "id": ...} objects; an id keys the sample\'s noise seed',
        ),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="tokens to generate per prompt")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = argmax")] = None,
    top_k: Annotated[int | None, typer.Option(help="top-k filtering, 0 = off")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus filtering, 1 = off")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="1 = off")] = None,
    ema: Annotated[
        bool | None, typer.Option("--ema/--raw-weights", help="sample with the EMA weights (default) or the raw ones")
    ] = None,
    keep_special_tokens: Annotated[
        bool, typer.Option(help="keep special tokens (EOS, padding, chat markers) in the text, as task outputs do")
    ] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE override of the run config")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write JSONL here instead of text")] = None,
) -> None:
    """Generate text from a trained run: JSONL with a "text" field per sample, or plain text on stdout."""
    # Flags are sugar for `--set sample.<field>=<value>`: one code path, validated by the recipe machinery.
    sugar = {
        "num_samples": num_samples,
        "steps": steps,
        "sampler": "euler" if sampler == "ode" else sampler,
        "guidance": guidance,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
        "use_ema": ema,
    }
    flags = sample_flags.overrides(sugar, typed={"sampler": str(sampler), "use_ema": ""})
    if (checkpoint is None) == (recipe is None):
        raise DataError(
            "give exactly one of --checkpoint PATH_OR_HUB_ID (a trained model) or --recipe NAME (released weights)"
        )
    prompts, sample_ids = _read_prompts(prompt, prompts_file)
    if output is not None:
        check_output_file(output)
    try:
        with progress.sampling() as on_step:
            loaded = _load(checkpoint, recipe, set_ or [], flags, tuple(sugar))
            settings = [o for o in flags if not o.startswith("sample.use_ema=")]  # use_ema chose the weights
            samples = cdlm.sample(
                loaded,
                prompts=prompts,
                sample_ids=sample_ids,
                overrides=settings,
                on_step=on_step,
                keep_special_tokens=keep_special_tokens,
            )
    except CdlmError as err:
        raise type(err)(sample_flags.in_flag_terms(str(err), flags)) from None
    if output is None:
        typer.echo("\n\n".join(s.text for s in samples))
        return
    try:
        with output.open("w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
    except OSError as err:
        raise OutputError(f"--output {output}: cannot be written ({err.strerror or err})") from None
    progress.say(f"wrote {len(samples)} samples to {output}")


def _load(
    checkpoint: str | None, recipe: str | None, sets: list[str], flags: dict[str, str], offered: tuple[str, ...]
) -> cdlm.Pretrained:
    """Load the model with the ``--set`` overrides (and the weights ``--ema/--raw-weights`` chose).

    The sampling flags are refused here when the method does not use them (before the model is loaded, for a
    recipe); the caller applies them to the loaded model.
    """
    at_load = [*sets, *(o for o in flags if o.startswith("sample.use_ema="))]
    if recipe is not None:
        config = cdlm.load_recipe(recipe, at_load)
        sample_flags.check_used(config, flags, offered)
        return cdlm.load_pretrained(config)
    loaded = cdlm.load_pretrained(checkpoint, overrides=at_load)
    sample_flags.check_used(loaded.config, flags, offered)
    return loaded
