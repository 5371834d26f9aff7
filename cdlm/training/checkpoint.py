"""Training checkpoints (atomic, complete, exactly resumable) and reading external weight files.

A checkpoint is a directory ``RUN_DIR/checkpoints/step-{step:08d}/`` holding

* ``model.safetensors``: the state dict of ``Method.modules()`` (trainable and frozen modules);
* ``ema.safetensors``: the EMA shadows of the trainable parameters;
* ``optimizer.safetensors``: every tensor of the optimiser state, keyed ``state.{param index}.{name}``;
* ``trainer_state.json``: the step, elapsed time, LR-schedule state, data-loader position, the optimiser's
  param groups and non-tensor state, and one RNG record per process (Python, NumPy, torch CPU, CUDA when
  in use, and every named ``torch.Generator``);
* ``config.yaml``: the resolved run config it was trained with.

It is written into a temporary sibling directory (``.tmp-*``), fsynced, then renamed into place with
``os.replace``: a directory named ``step-*`` is always complete, and a crash leaves at most a ``.tmp-*``
directory, which :func:`latest_checkpoint` ignores and the next :func:`save_checkpoint` removes. Older
checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from cdlm.errors import CheckpointError

CHECKPOINTS = "checkpoints"
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE = "model.safetensors", "ema.safetensors", "optimizer.safetensors"
STATE_FILE, CONFIG_FILE = "trainer_state.json", "config.yaml"
REQUIRED_FILES = (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE)
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_FORMAT = 1


@dataclass(frozen=True)
class CheckpointState:
    """Everything a checkpoint holds, on CPU.

    Attributes:
        path: the checkpoint directory.
        step: optimizer steps taken.
        elapsed_s: training wall time up to this step, summed over resumed sessions.
        model_state: ``Method.modules().state_dict()``.
        ema_state: EMA shadows by parameter name.
        optimizer_state: ``optimizer.state_dict()`` layout, ready for ``optimizer.load_state_dict``.
        scheduler_state: ``scheduler.state_dict()``.
        loader_state: the data loader's ``{"epoch", "position"}``.
        rng_state: one record of :func:`capture_rng_state` per process, indexed by rank.
        config_yaml: the resolved run config.
    """

    path: Path
    step: int
    elapsed_s: float
    model_state: dict[str, Tensor]
    ema_state: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    loader_state: dict[str, int]
    rng_state: list[dict[str, Any]]
    config_yaml: str


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: Mapping[str, Tensor],
    ema_state: Mapping[str, Tensor],
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    loader_state: Mapping[str, int],
    rng_state: Sequence[Mapping[str, Any]],
    config_yaml: str,
    keep_last: int,
    elapsed_s: float = 0.0,
) -> Path:
    """Write ``run_dir/checkpoints/step-{step:08d}/`` atomically and keep the newest ``keep_last`` checkpoints.

    Args:
        run_dir: the run directory.
        step: optimizer steps taken.
        model_state: ``Method.modules().state_dict()``; tensors on any device.
        ema_state: ``EMA.state_dict()``.
        optimizer_state: ``optimizer.state_dict()``.
        scheduler_state: ``scheduler.state_dict()`` (JSON-serialisable, as ``LambdaLR``'s is).
        loader_state: ``ResumableLoader.state_dict()``.
        rng_state: one :func:`capture_rng_state` record per process, indexed by rank.
        config_yaml: the resolved run config.
        keep_last: how many checkpoints to keep, the new one included.
        elapsed_s: training wall time so far.

    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale)
    final = checkpoint_dir(run_dir, step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    opt_tensors, opt_rest = _split_optimizer_state(optimizer_state)
    save_file(saveable(model_state), tmp / MODEL_FILE)
    save_file(saveable(ema_state), tmp / EMA_FILE)
    save_file(saveable(opt_tensors), tmp / OPTIMIZER_FILE)
    trainer_state = {
        "format": _FORMAT,
        "step": step,
        "elapsed_s": elapsed_s,
        "scheduler": dict(scheduler_state),
        "loader": dict(loader_state),
        "optimizer": opt_rest,
        "rng": list(rng_state),
    }
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
    (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    for name in REQUIRED_FILES:
        _fsync(tmp / name)
    _fsync(tmp)
    aside = None
    if final.exists():  # re-saving a step: move the old copy aside, delete it once the new one is in place
        aside = root / f"{TMP_PREFIX}replaced-{final.name}"
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(root)
    if aside is not None:
        shutil.rmtree(aside)
    for old in _step_dirs(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Return where the checkpoint of ``step`` lives: ``run_dir/checkpoints/step-{step:08d}``."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Return the checkpoint directory with the highest step under ``run_dir/checkpoints``, or None."""
    dirs = _step_dirs(Path(run_dir) / CHECKPOINTS)
    return dirs[-1] if dirs else None


def load_checkpoint(path: Path) -> CheckpointState:
    """Read a checkpoint directory, or the latest checkpoint of a run directory.

    Args:
        path: ``RUN_DIR/checkpoints/step-*`` or ``RUN_DIR`` itself.

    Returns:
        The checkpoint's contents, tensors on CPU.

    Raises:
        CheckpointError: the directory does not exist, holds no checkpoint, misses files, or a file is damaged
            (truncated, not safetensors, not JSON).
    """
    path = Path(path)
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path / CHECKPOINTS}: no checkpoint (no step-* directory); train into {path} first")
        path = latest
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory (expected a run directory or its step-* dir)")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{path}: incomplete checkpoint, missing {', '.join(missing)} (expected {', '.join(REQUIRED_FILES)}). "
            f"Remove it (rm -r {path}) and rerun training on the same run directory to resume from the previous "
            "checkpoint."
        )
    reading = STATE_FILE
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        weights = {}
        for reading in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE):
            weights[reading] = load_file(path / reading)
        reading = STATE_FILE
        return CheckpointState(
            path=path,
            step=int(state["step"]),
            elapsed_s=float(state["elapsed_s"]),
            model_state=weights[MODEL_FILE],
            ema_state=weights[EMA_FILE],
            optimizer_state=_join_optimizer_state(weights[OPTIMIZER_FILE], state["optimizer"]),
            scheduler_state=state["scheduler"],
            loader_state=state["loader"],
            rng_state=state["rng"],
            config_yaml=(path / CONFIG_FILE).read_text(encoding="utf-8"),
        )
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / reading}: damaged, cannot be read ({type(err).__name__}: {err})") from None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Return the checkpoint directories of ``run_dir``, by increasing step (``.tmp-*`` leftovers excluded)."""
    return _step_dirs(Path(run_dir) / CHECKPOINTS)


def read_state_dict(path: Path) -> dict[str, Any]:
    """Read external weights: safetensors (single or sharded) or a ``torch.save`` payload.

    Args:
        path: a ``.safetensors`` file; a directory with ``model.safetensors``, or with a sharded
            ``model.safetensors.index.json`` (its ``weight_map`` names the shard of every key); or any other
            file, read with ``torch.load(weights_only=True)``.

    Returns:
        {key: tensor} for safetensors; for a ``torch.save`` payload its raw top-level dict (callers pick
        e.g. ``["ema_params1"]``). Tensors are on CPU.

    Raises:
        CheckpointError: the path, the index, a shard or a key listed in the index is missing.
    """
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return load_file(path / MODEL_FILE)
        index = path / f"{MODEL_FILE}.index.json"
        if index.is_file():
            return _read_sharded(index)
        raise CheckpointError(f"{path}: neither {MODEL_FILE} nor {index.name} found in this directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file or directory")
    if path.suffix == ".safetensors":
        return load_file(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path}: torch.load gave a {type(payload).__name__}, expected a dict of weights")
    return dict(payload)


def _read_sharded(index: Path) -> dict[str, Tensor]:
    """Read the shards named by a safetensors index, checking every listed key is there."""
    weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (index.parent / s).is_file()]
    if absent:
        raise CheckpointError(f"{index}: shard file(s) missing from {index.parent}: {', '.join(absent)}")
    out: dict[str, Tensor] = {}
    for shard in shards:
        out.update(load_file(index.parent / shard))
    lost = sorted(set(weight_map) - set(out))
    if lost:
        raise CheckpointError(f"{index}: {len(lost)} key(s) listed in weight_map are in no shard: {lost[:5]}")
    return {key: out[key] for key in weight_map}


def capture_rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """Return this process's RNG states as a JSON-serialisable record.

    Args:
        generators: the named generators of the run (e.g. ``{"objective": g}``).

    Returns:
        ``{"python", "numpy", "torch", "cuda" (when CUDA is initialised), "generators": {name: state}}``.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    record: dict[str, Any] = {
        "python": [version, _encode(torch.tensor(internal, dtype=torch.int64)), gauss],  # 625 words < 2**32
        "numpy": [name, _encode(torch.from_numpy(keys.astype(np.int64))), pos, has_gauss, cached],
        "torch": _encode(torch.get_rng_state()),
        "generators": {key: _encode(g.get_state()) for key, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["cuda"] = _encode(torch.cuda.get_rng_state())
    return record


def restore_rng_state(record: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Restore the RNG states saved by :func:`capture_rng_state`, including every named generator.

    Raises:
        CheckpointError: the record's generator names differ from ``generators``'.
    """
    if set(record["generators"]) != set(generators):
        raise CheckpointError(
            f"checkpoint RNG record has generators {sorted(record['generators'])}, the run has {sorted(generators)}"
        )
    version, internal, gauss = record["python"]
    random.setstate((version, tuple(_decode(internal, torch.int64).tolist()), gauss))
    name, keys, pos, has_gauss, cached = record["numpy"]
    np.random.set_state((name, _decode(keys, torch.int64).numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode(record["torch"]))
    if "cuda" in record and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(record["cuda"]))
    for key, g in generators.items():
        g.set_state(_decode(record["generators"][key]))


def _encode(values: Tensor) -> str:
    """Base64 of a CPU tensor's raw bytes (RNG states: uint8 bytes or int64 words)."""
    return base64.b64encode(values.numpy().tobytes()).decode("ascii")


def _decode(text: str, dtype: torch.dtype = torch.uint8) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=dtype)


def _split_optimizer_state(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into its tensors and a JSON-serialisable rest."""
    tensors: dict[str, Tensor] = {}
    rest: dict[str, dict[str, Any]] = {}
    for idx, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                rest.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "state": rest}


def _join_optimizer_state(tensors: Mapping[str, Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {int(idx): dict(values) for idx, values in rest["state"].items()}
    for flat, value in tensors.items():
        _, idx, key = flat.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def saveable(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, cloned where two entries share storage (safetensors refuses that)."""
    out, seen = {}, set()
    for key, value in sd.items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen and value.numel() > 0 else value
        seen.add(ptr)
    return out


def _step_dirs(root: Path) -> list[Path]:
    """Return the complete checkpoint directories under ``root``, by increasing step."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
