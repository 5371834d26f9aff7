"""The public API behind ``cdlm train`` and ``cdlm sample``: build a method, train it, load it, sample from it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from cdlm import export
from cdlm.config import RunConfig, SampleConfig
from cdlm.data.pack import prepare
from cdlm.errors import DataError, RecipeError
from cdlm.export import write_checkpoint_dir
from cdlm.interfaces import GenerateRequest, Method
from cdlm.loading import load_source_tokenizer, load_weights, read_source, released_format
from cdlm.precision import autocast_context
from cdlm.recipes import check_overrides, raw_config, stage_config, to_yaml, with_overrides
from cdlm.registry import get_method
from cdlm.sampling.types import StepCallback
from cdlm.shards import DEFAULT_SHARD_BYTES
from cdlm.training import loop
from cdlm.training.checkpoint import CONFIG_FILE
from cdlm.validation import (
    check_device,
    check_method_config,
    check_output_dir,
    check_prompts,
    check_resume,
    check_run_config,
)

StatusCallback = Callable[[str], None]
"""Receives one-line news of a run: data phases, "resumed from step N", a damaged checkpoint passed over."""


def build(config: RunConfig) -> Method:
    """Build the method named by ``config.method`` through its registered plugin (works on the meta device).

    Raises:
        RecipeError: ``config`` is not a RunConfig, its sections are not the method's, or it breaks one of the
            method's cross-section rules (:func:`cdlm.validation.check_method_config`).
    """
    config = check_run_config(config)
    spec = get_method(config.method)
    check_method_config(config, spec)
    return spec.build(config)


def _check_vocab(tokenizer: PreTrainedTokenizerBase, method: Method, where: str) -> None:
    if len(tokenizer) > method.vocab_size:
        raise DataError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model reads {method.vocab_size} ids; "
            "set the model's vocabulary size to at least the tokenizer's (or use the tokenizer it was trained with)"
        )


def train(
    config: RunConfig,
    output_dir: str | Path,
    *,
    stage: str | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_status: StatusCallback | None = None,
    on_stage: Callable[[str, int], None] | None = None,
) -> loop.TrainResult:
    """Train ``config`` into ``output_dir``, resuming from its latest checkpoint if there is one.

    A recipe with ``stages`` trains each stage (or only ``stage``) into ``output_dir/<stage>``, each starting
    from the weights the previous stage ended with. Everything that can be checked before work starts is
    (the config, the output directory, that a resumed run has the same method, model and data settings, the
    stage name), and a failed start leaves the run's files as they were. A run stopped by SIGINT, SIGTERM or
    ``train.max_minutes`` returns with ``stopped`` set, after a checkpoint; later stages are not started.

    Args:
        config: a validated run config (:func:`cdlm.load_recipe`).
        output_dir: the run directory: config, tokenizer, metrics and checkpoints go there.
        stage: with a multi-stage recipe, train only this stage.
        on_log: called with every logged metrics record (``step``, ``loss``, ``lr``, …).
        on_status: called with one-line news (data phases, "resumed from step N", damaged checkpoints).
        on_stage: with stages, called as each stage starts with its name and its ``train.steps``.

    Returns:
        The final step, last checkpoint, last metrics record and early-stop reason (of the last stage trained).

    Raises:
        RecipeError: ``config`` is not a RunConfig, ``stage`` names no stage, or the run directory holds a run
            with other method, model or data settings.
        OutputError: the output directory is a file or cannot be created.
        TrainingError: a non-finite loss or gradient.
    """
    config = check_run_config(config)
    run_dir = Path(output_dir)
    if not config.stages:
        if stage is not None:
            raise RecipeError(f"--stage {stage}: the recipe has no stages")
        check_output_dir(run_dir)
        check_resume(config, run_dir)
        return _train_one(config, run_dir, run_dir, on_log, on_status)
    names = [s.name for s in config.stages]
    if stage is not None and stage not in names:
        raise RecipeError(f"--stage {stage}: the recipe has no stage {stage!r}; its stages are {names}")
    plan = []
    for name in names if stage is None else [stage]:
        stage_cfg = stage_config(config, name)
        index = names.index(name)
        if index > 0 and stage_cfg.train.init_from is None:
            train_cfg = stage_cfg.train.model_copy(update={"init_from": str(run_dir / names[index - 1])})
            stage_cfg = stage_cfg.model_copy(update={"train": train_cfg})
        plan.append((name, stage_cfg))
    check_output_dir(run_dir)
    check_resume(config, run_dir)
    for name, stage_cfg in plan:
        check_resume(stage_cfg, run_dir / name)
    (run_dir / CONFIG_FILE).write_text(to_yaml(config), encoding="utf-8")
    result = None
    for name, stage_cfg in plan:
        if on_stage is not None:
            on_stage(name, stage_cfg.train.steps)
        result = _train_one(stage_cfg, run_dir / name, run_dir, on_log, on_status)
        if result.stopped:
            break
    assert result is not None
    return result


def _train_one(
    config: RunConfig,
    run_dir: Path,
    tokenizer_dir: Path,
    on_log: Callable[[dict[str, float]], None] | None,
    on_status: StatusCallback | None,
) -> loop.TrainResult:
    data = prepare(config.data, tokenizer_dir, on_phase=on_status)
    method = build(config)
    _check_vocab(data.tokenizer, method, f"data.tokenizer={config.data.tokenizer!r}")
    if config.train.init_from is not None:
        init = read_source(config.train.init_from)
        load_weights(method, init, use_ema=config.train.init_weights == "ema")
    yaml_text = to_yaml(config)
    return loop.train(config, method, run_dir, data.rows, config_yaml=yaml_text, on_log=on_log, on_status=on_status)


@dataclass
class Pretrained:
    """A trained method ready to sample: its config, the built method (eval mode), tokenizer and provenance.

    Attributes:
        config: the run config the method was built from.
        method: the built method, weights loaded, in eval mode.
        tokenizer: its tokenizer.
        checkpoint: the path it was read from (None for a recipe that loads released weights itself).
        step: the training step of its weights, when known.
        kind: where it came from: ``"cdlm"`` (run or checkpoint), ``"hf"`` (``save_pretrained``), a released
            format's name, or ``"recipe"``.
        weights: ``"ema"`` or ``"raw"``, the weights loaded.
        metrics: the run's last logged training metrics, when known.
    """

    config: RunConfig
    method: Method
    tokenizer: PreTrainedTokenizerBase
    checkpoint: Path | None
    step: int | None = None
    kind: str = "cdlm"
    weights: str = "ema"
    metrics: dict[str, float] | None = None


def load_pretrained(
    source: str | Path | RunConfig, *, overrides: Sequence[str] = (), device: str | torch.device | None = None
) -> Pretrained:
    """Load a trained model: a run, a checkpoint, a ``save_pretrained`` directory, a released checkpoint, a hub id.

    Args:
        source: a run directory (``cdlm train -o DIR``; a staged run gives its last trained stage), one of its
            ``checkpoints/step-*`` directories, a :func:`save_pretrained` directory, a released checkpoint in a
            layout an installed plugin reads (ELF's ``checkpoint_<N>`` file or its directory, Cola's
            ``hf_models/`` tree), any of these as a Hugging Face hub id ``owner/name[@revision]``, or a
            :class:`RunConfig` whose method loads released weights itself (e.g. Cola's ``model.pretrained_dit``).
        overrides: ``KEY=VALUE`` overrides of the recorded or inferred config (e.g. ``sample.steps=64``,
            ``sample.use_ema=false`` for the raw weights).
        device: where to put the model; default CUDA when available, else CPU.

    Returns:
        The config, the method in eval mode (EMA weights unless ``sample.use_ema`` is false) and the tokenizer.

    Raises:
        CheckpointError: nothing loadable at ``source``, or the weights do not fit the config.
        DeviceError: ``device`` names an accelerator this machine does not have.
    """
    target = check_device(device)
    source_ = read_source(source, check_overrides(overrides))
    config = source_.config
    method = build(config)
    use_ema = config.sample.use_ema and source_.ema is not None
    load_weights(method, source_, use_ema=use_ema)
    method.modules().to(target).eval()
    tokenizer = load_source_tokenizer(source_)
    _check_vocab(tokenizer, method, f"data.tokenizer={config.data.tokenizer!r}")
    return Pretrained(
        config=config,
        method=method,
        tokenizer=tokenizer,
        checkpoint=source_.path,
        step=source_.step,
        kind=source_.kind,
        weights="ema" if use_ema else source_.weights_kind,
        metrics=source_.metrics,
    )


from_pretrained = load_pretrained
"""Alias of :func:`load_pretrained`, for the Hugging Face convention (``save_pretrained`` / ``from_pretrained``)."""


def save_pretrained(model: Pretrained, directory: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a loaded model in the Hugging Face convention: config, safetensors (sharded), tokenizer, model card.

    The weights written are the ones loaded (EMA or raw, recorded in ``config.json``); :func:`from_pretrained`
    on the directory (or on a hub repository holding it) gives the same model and samples.

    Returns:
        ``directory``.
    """
    return export.save_pretrained(
        directory,
        config=model.config,
        weights=model.method.modules().state_dict(),
        tokenizer=model.tokenizer,
        step=model.step,
        weights_kind=model.weights,
        metrics=model.metrics,
        max_shard_bytes=max_shard_bytes,
    )


def convert(
    source: str | Path | RunConfig, destination: str | Path, *, to: str = "cdlm", overrides: Sequence[str] = ()
) -> Path:
    """Convert a model between a cdlm checkpoint directory, the Hugging Face layout and released layouts.

    Args:
        source: anything :func:`load_pretrained` reads (run, checkpoint, ``save_pretrained`` or released
            checkpoint, hub id, recipe with released weights).
        destination: the directory to write into (created).
        to: ``"cdlm"`` (a checkpoint directory with raw and EMA weights, for sampling and ``train.init_from``),
            ``"hf"`` (:func:`save_pretrained`, the weights sampling uses) or a released format's name.
        overrides: ``KEY=VALUE`` overrides of the source's config.

    Returns:
        The path to hand to :func:`load_pretrained` (a directory, or a released format's file).

    Raises:
        CheckpointError: unknown target, or a source that cannot be read.
    """
    src = read_source(source, check_overrides(overrides))
    method = build(src.config)
    load_weights(method, src, use_ema=False)
    weights = {k: v.detach().cpu() for k, v in method.modules().state_dict().items()}
    tokenizer = load_source_tokenizer(src)
    destination = Path(destination)
    if to == "cdlm":
        return write_checkpoint_dir(
            destination,
            config=src.config,
            weights=weights,
            ema=src.ema,
            tokenizer=tokenizer,
            step=src.step,
            source=f"{src.kind}: {src.path}",
        )
    if to == "hf":
        use_ema = src.config.sample.use_ema and src.ema is not None
        shipped = {**weights, **(src.ema if use_ema else {})}
        return export.save_pretrained(
            destination,
            config=src.config,
            weights=shipped,
            tokenizer=tokenizer,
            step=src.step,
            weights_kind="ema" if use_ema else src.weights_kind,
            metrics=src.metrics,
        )
    fmt = released_format(to)
    return fmt.write(
        destination, config=src.config, weights=weights, ema=src.ema, step=src.step or 0, tokenizer=tokenizer
    )


def _sample_settings(config: RunConfig, overrides: Sequence[str]) -> SampleConfig:
    """Return the ``sample:`` section of ``config`` with ``overrides`` (all ``sample.*``: the model is built)."""
    others = [item for item in overrides if not item.strip().startswith("sample.")]
    if others:
        raise DataError(
            f"overrides {others}: a loaded model only takes sample.* overrides; pass the others to "
            "cdlm.load_pretrained(..., overrides=...)"
        )
    return with_overrides(raw_config(config), overrides).sample


def _text(tok: PreTrainedTokenizerBase, ids: list[int], keep_special_tokens: bool) -> str:
    """Decode ``ids`` without the U+FFFD fragments of byte-level tokens cut mid-character."""
    return tok.decode(ids, skip_special_tokens=not keep_special_tokens).replace("\ufffd", "")


@dataclass(frozen=True)
class Sample:
    """One generated sequence: its text, token ids, the prompt it continues and that prompt's id (if any)."""

    text: str
    ids: list[int]
    prompt: str | None = None
    id: int | str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the JSONL record ``{"id"?, "text", "prompt", "ids"}`` (``id`` only when the sample has one)."""
        record = {"text": self.text, "prompt": self.prompt, "ids": self.ids}
        return record if self.id is None else {"id": self.id, **record}


def sample(
    checkpoint: str | Path | RunConfig | Pretrained,
    *,
    prompts: Sequence[str] | None = None,
    sample_ids: Sequence[int | str | None] | None = None,
    overrides: Sequence[str] = (),
    on_step: StepCallback | None = None,
    keep_special_tokens: bool = False,
) -> list[Sample]:
    """Generate text from a trained run.

    Args:
        checkpoint: a run directory, a checkpoint directory, a :class:`RunConfig` that loads released weights
            (see :func:`load_pretrained`), or an already loaded :class:`Pretrained`.
        prompts: texts to condition on / continue (one sample each); None samples ``sample.num_samples``
            unconditionally.
        sample_ids: one id per sample (e.g. a task row's ``id``). A method that seeds each sample's noise keys
            it by this id (Cola with ``model.per_sample_noise_seed``), so a sample's output does not depend on
            its position in the request; None keys by position, as the reference does without ids.
        overrides: ``KEY=VALUE`` overrides of the recorded config, e.g. ``sample.steps=64`` (only ``sample.*`` for
            an already loaded :class:`Pretrained`).
        on_step: called after every solver step (progress, trajectories).
        keep_special_tokens: decode special tokens (EOS, padding, chat markers) into the text, as the reference's
            task outputs do; by default they are skipped and the text stops where the pipeline says it ends
            (Cola: the first end-of-text token).
            Either way the text holds no U+FFFD fragments of byte-level tokens cut mid-character; ``ids`` keep
            every generated token.

    Returns:
        One :class:`Sample` per prompt, or ``sample.num_samples`` samples.

    Raises:
        DataError: prompts that are not a list of non-empty strings, or ``sample_ids`` not one per sample.
        RecipeError: ``overrides`` is not a list of ``KEY=VALUE`` strings.
    """
    prompts = check_prompts(prompts)
    overrides = check_overrides(overrides)
    loaded = checkpoint if isinstance(checkpoint, Pretrained) else load_pretrained(checkpoint, overrides=overrides)
    settings = loaded.config.sample
    if isinstance(checkpoint, Pretrained) and overrides:
        settings = _sample_settings(loaded.config, overrides)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    tok = loaded.tokenizer
    prompt_ids = None
    if prompts is not None:
        if len(prompts) == 0:
            raise DataError("prompts: the list is empty; pass at least one prompt, or None to sample unconditionally")
        prompt_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        empty = [i for i, ids in enumerate(prompt_ids) if not ids]
        if empty:
            raise DataError(f"prompts {empty[:8]}: empty after tokenisation; give non-empty text")
    num = settings.num_samples if prompt_ids is None else len(prompt_ids)
    ids = None if sample_ids is None else list(sample_ids)
    if ids is not None and len(ids) != num:
        raise DataError(f"sample_ids: got {len(ids)} ids for {num} samples; give one id per prompt (or None)")
    generator = torch.Generator().manual_seed(settings.seed)
    device = next(loaded.method.modules().parameters()).device
    with autocast_context(device, loaded.config.train.precision):
        out = loaded.method.pipeline(GenerateRequest(num, prompt_ids, settings, ids), generator, on_step)
    ends = out.text_ends if out.text_ends is not None and not keep_special_tokens else [len(r) for r in out.ids]
    texts = [_text(tok, token_ids[:end], keep_special_tokens) for token_ids, end in zip(out.ids, ends, strict=True)]
    return [
        Sample(
            text=text,
            ids=token_ids,
            prompt=None if prompts is None else prompts[i],
            id=None if ids is None else ids[i],
        )
        for i, (text, token_ids) in enumerate(zip(texts, out.ids, strict=True))
    ]
