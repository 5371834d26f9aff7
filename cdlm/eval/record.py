"""What ``metrics.json`` records so that a number can be rerun: model, weights digest, judge, versions, device."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdlm.api import Pretrained
from cdlm.eval.gen_ppl import Judge
from cdlm.recipes import raw_config

PACKAGES = (
    "cdlm",
    "torch",
    "transformers",
    "tokenizers",
    "numpy",
    "sacrebleu",
    "rouge-score",
    "mauve-text",
    "scikit-learn",
    "lm_eval",
)


def weights_sha256(state: Mapping[str, Tensor]) -> str:
    """Return the SHA-256 of a state dict: every key, dtype, shape and the tensor bytes, in key order.

    It names the weights that were evaluated, whatever file layout they were read from.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Return the SHA-256 of a file's bytes (samples and task files the numbers came from)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Return the Python version and the installed version of every package a metric depends on (None if absent)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def device_record(device: torch.device) -> dict[str, Any]:
    """Return the device, its name on CUDA, and the CPU thread count."""
    record: dict[str, Any] = {"type": device.type, "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        record["name"] = torch.cuda.get_device_name(device)
    return record


def model_record(loaded: Pretrained, source: str) -> dict[str, Any]:
    """Return what identifies the evaluated model: source, kind, step, EMA or raw, weights digest and recipe."""
    return {
        "source": source,
        "path": None if loaded.checkpoint is None else str(loaded.checkpoint),
        "kind": loaded.kind,
        "method": loaded.config.method,
        "step": loaded.step,
        "weights": loaded.weights,
        "weights_sha256": weights_sha256(loaded.method.modules().state_dict()),
        "precision": loaded.config.train.precision,
        "recipe": raw_config(loaded.config),
    }


def judge_record(judge: Judge, max_length: int, batch_size: int) -> dict[str, Any]:
    """Return the judge's identity (name, hub commit when known, class, size, dtype, weights digest) and settings."""
    tokenizer = judge.tokenizer
    record: dict[str, Any] = {
        "name": judge.name,
        "tokenizer": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_id": tokenizer.eos_token_id,
        "padding_side": tokenizer.padding_side,
        "max_length": max_length,
    }
    if judge.model is not None:
        record.update(
            {
                "commit": getattr(judge.model.config, "_commit_hash", None),
                "class": type(judge.model).__name__,
                "parameters": sum(p.numel() for p in judge.model.parameters()),
                "dtype": judge.dtype,
                "batch_size": batch_size,
                "weights_sha256": weights_sha256(judge.model.state_dict()),
            }
        )
    return record


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` as indented JSON (keys in insertion order), creating the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
