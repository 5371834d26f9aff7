"""Checks of the public API's arguments, run before any work starts, each failing with a one-line CdlmError.

Everything here is cheap (no data, no model): :func:`cdlm.train` and :func:`cdlm.sample` call these first, so a
bad argument never costs a data preparation or a model load, and a failed start never changes a run's files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from cdlm.config import RunConfig
from cdlm.errors import DataError, DeviceError, OutputError, RecipeError
from cdlm.interfaces import MethodSpec
from cdlm.recipes import cross_section_problems, raw_config
from cdlm.training.checkpoint import CONFIG_FILE, latest_checkpoint

RESUME_SECTIONS = ("method", "model", "data")
"""The config sections a resumed run must share with the run it continues (train and sample may change)."""
RESUME_FREE = frozenset({"data.num_proc", "data.cache_dir"})
"""Fields of those sections that say how the rows are made, not which rows: a resume may change them."""


def check_run_config(config: object) -> RunConfig:
    """Return ``config`` if it is a validated :class:`RunConfig`.

    Raises:
        RecipeError: anything else (a dict, a recipe name), with how to make one.
    """
    if not isinstance(config, RunConfig):
        raise RecipeError(
            f"config: expected a RunConfig, got {type(config).__name__}; make one with cdlm.load_recipe(NAME_OR_FILE, "
            "overrides) (or cdlm.recipes.validate(mapping) for a dict)"
        )
    return config


def check_method_config(config: RunConfig, spec: MethodSpec) -> None:
    """Check, before ``spec`` builds ``config``, that its sections are the method's and its cross-section rules hold.

    :func:`cdlm.load_recipe` checks the same; this also covers a config made or changed in Python
    (``RunConfig(...)``, ``model_copy(update=...)``), which skips recipe validation.

    Raises:
        RecipeError: a ``model:`` or ``sample:`` section of another class than the method's, or a broken
            cross-section rule (e.g. ELF's ``data.seq_len`` against ``model.max_length``); one line each.
    """
    problems = [
        f"{name}: method {spec.name!r} takes {cls.__module__}.{cls.__name__}, got {type(section).__name__}; build "
        "the section as one, or the whole config with cdlm.load_recipe / cdlm.recipes.validate"
        for name, cls, section in (
            ("model", spec.config_cls, config.model),
            ("sample", spec.sample_config_cls, config.sample),
        )
        if not isinstance(section, cls)
    ]
    if not problems:
        problems = [f"{fields[0]}: {problem}" for fields, problem in cross_section_problems(spec, config)]
    if problems:
        raise RecipeError("\n".join(problems))


def check_output_dir(run_dir: Path) -> None:
    """Check that ``run_dir`` is a directory or can become one.

    Raises:
        OutputError: it is an existing file, or sits inside one, or cannot be created.
    """
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise OutputError(
                f"--output-dir {run_dir}: {parent} is an existing file, not a directory; choose another run directory"
            )
        if parent.exists():
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"--output-dir {run_dir}: cannot create the run directory ({err.strerror})") from None


def check_resume(config: RunConfig, run_dir: Path) -> None:
    """Check that ``config`` may continue the run in ``run_dir`` (same method, model and data), if it has one.

    A run is there when ``run_dir`` has checkpoints, or is the top directory of a multi-stage run.

    Raises:
        RecipeError: ``run_dir`` holds a run whose method, model or data settings differ; the message lists the
            fields, the recorded value and the new one.
    """
    recorded_file = run_dir / CONFIG_FILE
    if not recorded_file.is_file():
        return
    try:
        recorded = yaml.safe_load(recorded_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        return  # the checkpoint's own config.yaml is checked when it is loaded
    if not isinstance(recorded, dict) or (latest_checkpoint(run_dir) is None and not recorded.get("stages")):
        return
    new = raw_config(config)
    if recorded.get("method") != new["method"]:
        raise RecipeError(
            f"{recorded_file}: this directory holds a run of method {recorded.get('method')!r}, not {new['method']!r}; "
            "train into a new --output-dir"
        )
    changes = [
        f"{key}: {old!r} → {new_value!r}"
        for section in RESUME_SECTIONS
        for key, old, new_value in _differences(section, recorded.get(section), new.get(section))
        if key not in RESUME_FREE
    ]
    if changes:
        shown = "; ".join(changes[:4]) + ("; …" if len(changes) > 4 else "")
        raise RecipeError(
            f"{recorded_file}: this run was trained with other settings than the ones given ({shown}); "
            f"resuming would not fit its checkpoints. Train into a new --output-dir, or use the recorded settings"
        )


def _differences(prefix: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """Return ``(dotted key, old, new)`` for every leaf that differs; keys the recorded side lacks are skipped."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [d for key in old for d in _differences(f"{prefix}.{key}", old[key], new.get(key))]
    return [] if old == new else [(prefix, old, new)]


def check_prompts(prompts: object) -> list[str] | None:
    """Return ``prompts`` as a list of strings (None stays None).

    Raises:
        DataError: one string instead of a list, or an entry that is not a string.
    """
    if prompts is None:
        return None
    if isinstance(prompts, str):
        raise DataError(
            f"prompts={prompts!r}: expected a list of strings, got one string (it would be read as one prompt per "
            f"character); write prompts=[{prompts!r}]"
        )
    if not isinstance(prompts, Sequence):
        raise DataError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise DataError(
            f"prompts[{bad[0]}]: expected a string, got {type(prompts[bad[0]]).__name__}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        )
    return list(prompts)


def check_device(device: str | torch.device | None) -> torch.device:
    """Return the device to load onto: ``device``, or CUDA when available, else the CPU.

    Raises:
        DeviceError: ``device`` is not a device name, or names an accelerator this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"device={device!r}: not a device name ({err}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            raise DeviceError(
                f"device={device!r}: this machine has {count} CUDA device(s); use device='cpu' (or None: CUDA when "
                "available, else the CPU)"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={device!r}: MPS is not available on this machine; use device='cpu'")
    return resolved


def check_output_file(path: Path, flag: str = "--output") -> None:
    """Check that ``path`` can be written, before the work whose result goes there starts.

    Creates the missing parent directories, and probes the parent with a temporary file (removed at once).

    Raises:
        OutputError: ``path`` is a directory, sits inside a file, or its directory cannot be written.
    """
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory; give a file name, e.g. {path / 'samples.jsonl'}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"{flag} {path}: {parent} is a file, not a directory")
        if parent.exists():
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise OutputError(f"{flag} {path}: cannot write into {path.parent} ({err.strerror or err})") from None
