"""Writing a trained model out, and reading it back: the Hugging Face layout and a cdlm checkpoint directory.

``save_pretrained`` layout (what ``cdlm convert --to hf`` writes and ``from_pretrained`` / ``load_pretrained``
read, from a directory or a hub id)::

    DIR/config.json                      {"cdlm_format": 1, "method", "step", "weights", "recipe": {...}}
    DIR/model.safetensors                the weights sampling uses (EMA when the run samples with EMA),
                                         or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json
    DIR/README.md                        the model card: method, recipe, training steps, last metrics

A cdlm checkpoint directory (``--to cdlm``) is what a training checkpoint holds for sampling and
``train.init_from``: ``config.yaml``, ``model.safetensors`` (raw weights), ``ema.safetensors``, the tokenizer and
``provenance.json`` (the training step and where the weights came from).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from cdlm.config import RunConfig
from cdlm.errors import CheckpointError
from cdlm.recipes import raw_config, to_yaml
from cdlm.shards import DEFAULT_SHARD_BYTES, write_weights
from cdlm.training.checkpoint import CONFIG_FILE, EMA_FILE, MODEL_FILE, read_state_dict, saveable

HF_CONFIG = "config.json"
CARD_FILE = "README.md"
PROVENANCE_FILE = "provenance.json"
FORMAT_VERSION = 1


def is_pretrained_dir(path: Path) -> bool:
    """Return whether ``path`` is a ``save_pretrained`` directory (its ``config.json`` says ``cdlm_format``)."""
    config = path / HF_CONFIG
    if not config.is_file():
        return False
    try:
        return "cdlm_format" in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def read_pretrained_dir(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a ``save_pretrained`` directory: its ``config.json`` (``recipe``, ``step``, ``weights``) and weights.

    Raises:
        CheckpointError: ``config.json`` has another format version or no recipe, or the weights are missing.
    """
    meta = json.loads((path / HF_CONFIG).read_text(encoding="utf-8"))
    if meta.get("cdlm_format") != FORMAT_VERSION or not isinstance(meta.get("recipe"), dict):
        raise CheckpointError(
            f"{path / HF_CONFIG}: expected cdlm_format {FORMAT_VERSION} with a 'recipe' object, got "
            f"cdlm_format {meta.get('cdlm_format')!r}; written by a newer cdlm?"
        )
    return meta, read_state_dict(path)


def save_pretrained(
    directory: str | Path,
    *,
    config: RunConfig,
    weights: Mapping[str, Tensor],
    tokenizer: PreTrainedTokenizerBase,
    step: int | None,
    weights_kind: str,
    metrics: Mapping[str, float] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a model in the Hugging Face convention, with a model card (see the module docstring).

    Args:
        directory: created if missing; its weight, config, tokenizer and card files are replaced.
        config: the run config the weights were built with (recorded as ``recipe``).
        weights: the full ``Method.modules()`` state dict to ship.
        tokenizer: the run's tokenizer, saved beside the weights.
        step: the training step, or None when unknown.
        weights_kind: ``"ema"`` or ``"raw"``, which weights these are (recorded, and said in the card).
        metrics: the last logged training metrics, for the card.
        max_shard_bytes: weights above this are sharded.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    write_weights(directory, weights, max_shard_bytes=max_shard_bytes)
    meta = {
        "cdlm_format": FORMAT_VERSION,
        "method": config.method,
        "step": step,
        "weights": weights_kind,
        "recipe": raw_config(config),
    }
    (directory / HF_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(str(directory))
    (directory / CARD_FILE).write_text(model_card(config, step, weights_kind, metrics), encoding="utf-8")
    return directory


def model_card(config: RunConfig, step: int | None, weights_kind: str, metrics: Mapping[str, float] | None) -> str:
    """Return a short Markdown model card: what the model is, how it was trained, how to load it."""
    front = {"library_name": "cdlm", "tags": ["cdlm", config.method, "diffusion-language-model"]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {config.description or config.method}",
        "",
        f"- method: `{config.method}`",
        f"- training steps: {step if step is not None else 'unknown'}",
        f"- weights: {weights_kind}",
        f"- training data: `{config.data.source}`, tokenizer `{config.data.tokenizer}`, {config.data.seq_len} tokens",
        "- sampling: " + ", ".join(f"{k} {v}" for k, v in config.sample.model_dump(mode="json").items()),
    ]
    if metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        lines.append(f"- last training metrics: {shown}")
    lines += [
        "",
        "Load it with `cdlm sample --checkpoint <this directory or hub id>` or, in Python,",
        '`cdlm.load_pretrained("<this directory or hub id>")`. `config.json` holds the full recipe.',
        "",
    ]
    return "\n".join(lines)


def write_checkpoint_dir(
    directory: str | Path,
    *,
    config: RunConfig,
    weights: Mapping[str, Tensor],
    ema: Mapping[str, Tensor] | None,
    tokenizer: PreTrainedTokenizerBase,
    step: int | None,
    source: str,
) -> Path:
    """Write a cdlm checkpoint directory for sampling and ``train.init_from`` (see the module docstring).

    ``ema`` None writes an empty ``ema.safetensors``: sampling with EMA then uses the raw weights. ``step`` and
    ``source`` (what was converted) go to ``provenance.json``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(saveable(weights), directory / MODEL_FILE)
    save_file(saveable(ema if ema is not None else {}), directory / EMA_FILE)
    (directory / CONFIG_FILE).write_text(to_yaml(config), encoding="utf-8")
    tokenizer.save_pretrained(str(directory))
    provenance = {"step": step, "source": source}
    (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return directory
