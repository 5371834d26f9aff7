"""Reading a trained model from wherever it lives, before anything is built.

A source is, in the order tried:

1. a ``save_pretrained`` directory (:mod:`cdlm.export`; ``config.json`` with ``cdlm_format``);
2. a cdlm run directory (its latest checkpoint; a staged run: its last trained stage) or checkpoint directory;
3. a released checkpoint in a layout an installed plugin reads (``MethodSpec.released_formats``: ELF's
   ``checkpoint_<N>`` files, Cola's ``hf_models/`` tree, …).

Any of them may be given as a Hugging Face hub id, downloaded (or found in the cache) first (:mod:`cdlm.hub`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cdlm.config import RunConfig
from cdlm.data.tokenize import TOKENIZER_FILE, load_tokenizer
from cdlm.errors import CheckpointError, DataError
from cdlm.export import PROVENANCE_FILE, is_pretrained_dir, read_pretrained_dir
from cdlm.hub import resolve_source
from cdlm.interfaces import Method, ReleasedFormat
from cdlm.recipes import load_recipe, with_overrides
from cdlm.registry import get_method, installed_methods
from cdlm.training.checkpoint import CHECKPOINTS, CONFIG_FILE, EMA_FILE, MODEL_FILE, latest_checkpoint
from cdlm.training.loop import METRICS_FILE, last_record

HF_TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class Source:
    """A model read from disk, not yet built.

    Attributes:
        config: the run config (recorded or inferred, with the caller's overrides applied).
        weights: ``Method.modules()`` keys → tensors, the raw trained weights; None when the build loads its
            weights itself (a recipe naming released weights).
        ema: EMA shadows to put on top of ``weights`` when sampling with EMA, or None.
        step: the training step, when known.
        path: the checkpoint, run, release or ``save_pretrained`` path it was read from (None for a recipe).
        kind: ``"cdlm"``, ``"hf"``, a plugin format name, or ``"recipe"``.
        tokenizer_dir: where its tokenizer lives (a saved tokenizer, or a run's trained BPE).
        metrics: the run's last logged training metrics, when known.
        weights_kind: what ``weights`` are, ``"raw"``, or ``"ema"`` for a ``save_pretrained`` of EMA weights.
    """

    config: RunConfig
    weights: dict[str, Tensor] | None
    ema: dict[str, Tensor] | None
    step: int | None
    path: Path | None
    kind: str
    tokenizer_dir: Path
    metrics: dict[str, float] | None = None
    weights_kind: str = "raw"


def read_source(source: str | Path | RunConfig, overrides: Sequence[str] = ()) -> Source:
    """Read the model at ``source`` (see the module docstring); weights stay on the CPU.

    Raises:
        CheckpointError: nothing loadable is there; the message lists what was looked for.
    """
    if isinstance(source, RunConfig):
        if source.data.tokenizer == "bpe":
            raise CheckpointError("a recipe without a checkpoint needs a pretrained data.tokenizer, not 'bpe'")
        return Source(source, None, None, None, None, "recipe", Path.cwd())
    path = resolve_source(source)
    if path.is_dir() and is_pretrained_dir(path):
        meta, weights = read_pretrained_dir(path)
        config = with_overrides(meta["recipe"], overrides, path=path / "config.json")
        return Source(
            config, weights, None, meta.get("step"), path, "hf", path, weights_kind=meta.get("weights", "raw")
        )
    if path.is_dir() and _looks_like_cdlm(path):
        return _read_cdlm(checkpoint_dir(path), overrides)
    fmt = _released_format(path)
    if fmt is not None:
        released = fmt.read(path)
        config = with_overrides(released.recipe, overrides, path=path)
        return Source(config, released.weights, released.ema, released.step, path, fmt.name, Path.cwd())
    if path.is_dir() and (path / MODEL_FILE).is_file():
        checkpoint_dir(path)  # raises: weights without the config that says what they fit
    known = ", ".join(f.name for f in _formats()) or "none installed"
    raise CheckpointError(
        f"{path}: not a cdlm run or checkpoint directory (no {CHECKPOINTS}/, {MODEL_FILE} or {CONFIG_FILE}), "
        f"not a save_pretrained directory (no config.json with cdlm_format), and no released layout matches "
        f"({known})"
    )


def _read_cdlm(ckpt: Path, overrides: Sequence[str]) -> Source:
    config = load_recipe(ckpt / CONFIG_FILE, overrides)
    weights = _load_safetensors(ckpt / MODEL_FILE)
    has_ema = config.sample.use_ema or (ckpt / EMA_FILE).is_file()
    ema = _load_safetensors(ckpt / EMA_FILE) if has_ema else None
    run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt
    step = None
    for record in (ckpt / "trainer_state.json", ckpt / PROVENANCE_FILE):  # a training checkpoint, a converted one
        if record.is_file():
            step = json.loads(record.read_text(encoding="utf-8")).get("step")
    metrics = last_record(run_dir / METRICS_FILE) or None
    return Source(config, weights, ema, step, ckpt, "cdlm", _tokenizer_dir(run_dir, config), metrics)


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        hint = " (or sample the raw weights: --raw-weights / sample.use_ema=false)" if path.name == EMA_FILE else ""
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); the checkpoint is damaged") from err


def load_weights(method: Method, source: Source, *, use_ema: bool) -> None:
    """Load ``source``'s weights (EMA shadows on top when ``use_ema``) into ``method``.

    Every key of the file must be a key of the method. Keys the file lacks are allowed only for released
    checkpoints, and only in the method's frozen modules (which its build loads itself, e.g. a pretrained T5).

    Raises:
        CheckpointError: unexpected keys, or missing keys of trained modules; names the file and the recipe.
    """
    if source.weights is None:
        return
    state = dict(source.weights)
    if use_ema and source.ema is not None:
        state.update(source.ema)
    missing, unexpected = method.modules().load_state_dict(state, strict=False)
    if source.kind not in ("cdlm", "hf"):
        frozen = tuple(f"{name}." for name in method.frozen)
        missing = [key for key in missing if not key.startswith(frozen)]
    if missing or unexpected:
        raise CheckpointError(
            f"{source.path}: {len(missing)} missing keys ({', '.join(missing[:4])}) and {len(unexpected)} "
            f"unexpected keys ({', '.join(unexpected[:4])}); saved with another model config? "
            f"(method {source.config.method!r})"
        )


def load_source_tokenizer(source: Source) -> PreTrainedTokenizerBase:
    """Return ``source``'s tokenizer: the one saved beside it, else what ``data.tokenizer`` names."""
    if (source.tokenizer_dir / HF_TOKENIZER_CONFIG).is_file():
        try:
            return AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
        except (OSError, ValueError) as err:
            raise DataError(f"{source.tokenizer_dir}: its saved tokenizer cannot be loaded: {err}") from err
    return load_tokenizer(source.config.data, source.tokenizer_dir, texts=())


def _looks_like_cdlm(path: Path) -> bool:
    """A run or checkpoint directory: it has checkpoints or a run config (released layouts may hold MODEL_FILE)."""
    return any((path / name).exists() for name in (CHECKPOINTS, CONFIG_FILE))


def checkpoint_dir(path: Path) -> Path:
    """Resolve a run directory (its latest checkpoint; a staged run: its last trained stage) or a checkpoint."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory; train one with `cdlm train -o {path}`")
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path / CHECKPOINTS}: no checkpoint yet; train into {path} first")
        return latest
    if (path / MODEL_FILE).is_file():
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"{path}: holds {MODEL_FILE} but no {CONFIG_FILE} (the run config a cdlm checkpoint keeps beside its "
                "weights) nor a save_pretrained config.json; weights alone do not say which model they fit: copy "
                f"the {CONFIG_FILE} of the run that trained them into {path}"
            )
        return path
    stages = [path / name for name in _stage_names(path)]
    trained = [stage for stage in stages if latest_checkpoint(stage) is not None]
    if trained:
        return checkpoint_dir(trained[-1])
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


def _tokenizer_dir(run_dir: Path, config: RunConfig) -> Path:
    """Return where the run's tokenizer lives: saved beside it, its trained BPE, or a staged run's top directory."""
    if config.data.tokenizer != "bpe" or (run_dir / HF_TOKENIZER_CONFIG).is_file():
        return run_dir
    for candidate in (run_dir, run_dir.parent):
        if (candidate / TOKENIZER_FILE).is_file():
            return candidate
    raise CheckpointError(f"{run_dir / TOKENIZER_FILE}: missing; the run's trained tokenizer is needed to decode")


def _formats() -> list[ReleasedFormat]:
    return [fmt for name in installed_methods() for fmt in get_method(name).released_formats]


def _released_format(path: Path) -> ReleasedFormat | None:
    return next((fmt for fmt in _formats() if fmt.detect(path)), None)


def released_format(name: str) -> ReleasedFormat:
    """Return the installed released format called ``name``.

    Raises:
        CheckpointError: no installed plugin has a format of that name.
    """
    found = {fmt.name: fmt for fmt in _formats()}
    if name not in found:
        raise CheckpointError(f"format {name!r}: no installed plugin writes it; known: {sorted(found)}")
    return found[name]
