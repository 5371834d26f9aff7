"""Writing weights as safetensors in the Hugging Face layout: one ``model.safetensors``, or shards and an index.

Above ``max_shard_bytes`` the state dict is split, in key order, into ``model-0000k-of-0000n.safetensors``
files with a ``model.safetensors.index.json`` whose ``weight_map`` names the shard of every key, as
``transformers``' ``save_pretrained`` does; :func:`cdlm.training.checkpoint.read_state_dict` reads both forms.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from cdlm.training.checkpoint import MODEL_FILE, saveable

INDEX_FILE = f"{MODEL_FILE}.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
"""Hugging Face's default shard limit (5 GB): the release Cola DiT, 7.3 GB in fp32, is two shards under it."""


def _shard_plan(sd: Mapping[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Group keys, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, value in sd.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_weights(
    directory: str | Path, sd: Mapping[str, Tensor], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[Path]:
    """Write ``sd`` into ``directory`` as ``model.safetensors``, or as shards plus an index when it is larger.

    Args:
        directory: created if missing; earlier weight files of either form there are replaced.
        sd: the state dict (any device; written as contiguous CPU tensors, shared storage cloned).
        max_shard_bytes: the largest shard; the total below it gives a single file.

    Returns:
        The files written, the index last when sharded.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in [directory / MODEL_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    tensors = saveable(sd)
    plan = _shard_plan(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(plan) == 1:
        save_file(tensors, directory / MODEL_FILE, metadata=metadata)
        return [directory / MODEL_FILE]
    written, weight_map, total = [], {}, 0
    for i, keys in enumerate(plan, 1):
        name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, directory / name, metadata=metadata)
        written.append(directory / name)
        weight_map.update(dict.fromkeys(keys, name))
        total += sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*written, directory / INDEX_FILE]
