"""The public API behind ``cdlm train`` and ``cdlm sample``: build a method, train it, load it, sample from it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from cdlm.config import RunConfig
from cdlm.data.pack import prepare
from cdlm.data.tokenize import TOKENIZER_FILE, load_tokenizer
from cdlm.errors import CheckpointError, DataError, RecipeError
from cdlm.interfaces import GenerateRequest, Method
from cdlm.precision import autocast_context
from cdlm.recipes import load_recipe, stage_config, to_yaml
from cdlm.registry import get_method
from cdlm.sampling.types import StepCallback
from cdlm.training import loop
from cdlm.training.checkpoint import CHECKPOINTS, CONFIG_FILE, EMA_FILE, MODEL_FILE, latest_checkpoint


def build(config: RunConfig) -> Method:
    """Build the method named by ``config.method`` through its registered plugin (works on the meta device)."""
    return get_method(config.method).build(config)


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
) -> loop.TrainResult:
    """Train ``config`` into ``output_dir``, resuming from its latest checkpoint if there is one.

    A recipe with ``stages`` trains each stage (or only ``stage``) into ``output_dir/<stage>``, each starting
    from the weights the previous stage ended with.

    Args:
        config: a validated run config (:func:`cdlm.load_recipe`).
        output_dir: the run directory: config, tokenizer, metrics and checkpoints go there.
        stage: with a multi-stage recipe, train only this stage.
        on_log: called with every logged metrics record (``step``, ``loss``, ``lr``, …).

    Returns:
        The final step, last checkpoint and last metrics record (of the last stage trained).

    Raises:
        RecipeError: ``stage`` is given but the recipe has no stage of that name.
    """
    run_dir = Path(output_dir)
    if not config.stages:
        if stage is not None:
            raise RecipeError(f"--stage {stage}: the recipe has no stages")
        return _train_one(config, run_dir, run_dir, on_log)
    names = [s.name for s in config.stages]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(to_yaml(config), encoding="utf-8")
    result = None
    for name in names if stage is None else [stage]:
        stage_cfg = stage_config(config, name)
        index = names.index(name)
        if index > 0 and stage_cfg.train.init_from is None:
            train_cfg = stage_cfg.train.model_copy(update={"init_from": str(run_dir / names[index - 1])})
            stage_cfg = stage_cfg.model_copy(update={"train": train_cfg})
        result = _train_one(stage_cfg, run_dir / name, run_dir, on_log)
    assert result is not None
    return result


def _train_one(
    config: RunConfig, run_dir: Path, tokenizer_dir: Path, on_log: Callable[[dict[str, float]], None] | None
) -> loop.TrainResult:
    data = prepare(config.data, tokenizer_dir)
    method = build(config)
    _check_vocab(data.tokenizer, method, f"data.tokenizer={config.data.tokenizer!r}")
    if config.train.init_from is not None:
        _load_weights(method, _checkpoint_dir(Path(config.train.init_from)), use_ema=False)
    return loop.train(config, method, run_dir, data.rows, config_yaml=to_yaml(config), on_log=on_log)


def _load_weights(method: Method, ckpt: Path, *, use_ema: bool) -> None:
    """Load a checkpoint's model weights (EMA shadows on top when ``use_ema``) into ``method``, strictly."""
    state = load_file(ckpt / MODEL_FILE)
    if use_ema:
        state.update(load_file(ckpt / EMA_FILE))
    missing, unexpected = method.modules().load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt / MODEL_FILE}: {len(missing)} missing keys ({', '.join(missing[:4])}) and {len(unexpected)} "
            f"unexpected keys ({', '.join(unexpected[:4])}); saved by another recipe? see {ckpt / CONFIG_FILE}"
        )


@dataclass
class Pretrained:
    """A trained method ready to sample: its config, the built method (eval mode) and its tokenizer."""

    config: RunConfig
    method: Method
    tokenizer: PreTrainedTokenizerBase
    checkpoint: Path | None


def _checkpoint_dir(path: Path) -> Path:
    """Resolve a run directory (its latest checkpoint; a staged run: its last trained stage) or a checkpoint."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory; train one with `cdlm train -o {path}`")
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path / CHECKPOINTS}: no checkpoint yet; train into {path} first")
        return latest
    if (path / MODEL_FILE).is_file():
        return path
    stages = [path / name for name in _stage_names(path)]
    trained = [stage for stage in stages if latest_checkpoint(stage) is not None]
    if trained:
        return _checkpoint_dir(trained[-1])
    if stages:
        raise CheckpointError(f"{path}: no stage has a checkpoint yet ({', '.join(s.name for s in stages)})")
    raise CheckpointError(
        f"{path}: not a run directory (no {CHECKPOINTS}/) nor a checkpoint directory (no {MODEL_FILE})"
    )


def _stage_names(run_dir: Path) -> list[str]:
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        return []
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    return [stage["name"] for stage in raw.get("stages") or []]


def load_pretrained(
    source: str | Path | RunConfig, *, overrides: Sequence[str] = (), device: str | torch.device | None = None
) -> Pretrained:
    """Load a trained run, one of its checkpoints, or a recipe whose weights come from its own config.

    Args:
        source: a run directory (``cdlm train -o DIR``; a staged run gives its last trained stage), one of its
            ``checkpoints/step-*`` directories, or a :class:`RunConfig` whose method loads released weights
            itself (e.g. Cola's ``model.pretrained_dit``) and whose ``data.tokenizer`` is a pretrained tokenizer.
        overrides: ``KEY=VALUE`` overrides of the recorded config (e.g. ``sample.steps=64``).
        device: where to put the model; default CUDA when available, else CPU.

    Returns:
        The config, the method in eval mode (EMA weights unless ``sample.use_ema`` is false) and the tokenizer.

    Raises:
        CheckpointError: the path holds no checkpoint, or the weights do not fit the recorded config.
    """
    if isinstance(source, RunConfig):
        if source.data.tokenizer == "bpe":
            raise CheckpointError("a recipe without a checkpoint needs a pretrained data.tokenizer, not 'bpe'")
        config, ckpt, tokenizer_dir = source, None, Path.cwd()
        method = build(config)
    else:
        ckpt = _checkpoint_dir(Path(source))
        config = load_recipe(ckpt / CONFIG_FILE, overrides)
        method = build(config)
        _load_weights(method, ckpt, use_ema=config.sample.use_ema)
        run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt
        tokenizer_dir = _tokenizer_dir(run_dir, config)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    method.modules().to(torch.device(device)).eval()
    tokenizer = load_tokenizer(config.data, tokenizer_dir, texts=())
    _check_vocab(tokenizer, method, f"data.tokenizer={config.data.tokenizer!r}")
    return Pretrained(config=config, method=method, tokenizer=tokenizer, checkpoint=ckpt)


def _tokenizer_dir(run_dir: Path, config: RunConfig) -> Path:
    """Return where the run's trained BPE lives: the run directory, or a staged run's top directory."""
    if config.data.tokenizer != "bpe":
        return run_dir
    for candidate in (run_dir, run_dir.parent):
        if (candidate / TOKENIZER_FILE).is_file():
            return candidate
    raise CheckpointError(f"{run_dir / TOKENIZER_FILE}: missing; the run's trained tokenizer is needed to decode")


@dataclass(frozen=True)
class Sample:
    """One generated sequence: its text, token ids and the prompt it continues (if any)."""

    text: str
    ids: list[int]
    prompt: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the JSONL record ``{"text", "prompt", "ids"}``."""
        return {"text": self.text, "prompt": self.prompt, "ids": self.ids}


def sample(
    checkpoint: str | Path | RunConfig | Pretrained,
    *,
    prompts: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    on_step: StepCallback | None = None,
) -> list[Sample]:
    """Generate text from a trained run.

    Args:
        checkpoint: a run directory, a checkpoint directory, a :class:`RunConfig` that loads released weights
            (see :func:`load_pretrained`), or an already loaded :class:`Pretrained`.
        prompts: texts to condition on / continue (one sample each); None samples ``sample.num_samples``
            unconditionally.
        overrides: ``KEY=VALUE`` overrides of the recorded config, e.g. ``sample.steps=64``.
        on_step: called after every solver step (progress, trajectories).

    Returns:
        One :class:`Sample` per prompt, or ``sample.num_samples`` samples.

    Raises:
        DataError: an empty prompt list or an empty prompt.
    """
    loaded = checkpoint if isinstance(checkpoint, Pretrained) else load_pretrained(checkpoint, overrides=overrides)
    settings = loaded.config.sample
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
    generator = torch.Generator().manual_seed(settings.seed)
    device = next(loaded.method.modules().parameters()).device
    with autocast_context(device, loaded.config.train.precision):
        out = loaded.method.pipeline(GenerateRequest(num, prompt_ids, settings), generator, on_step)
    texts = tok.batch_decode(out.ids, skip_special_tokens=True)
    return [
        Sample(text=text, ids=ids, prompt=None if prompts is None else prompts[i])
        for i, (text, ids) in enumerate(zip(texts, out.ids, strict=True))
    ]
