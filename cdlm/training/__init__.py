"""Training: the one Accelerate loop, the public :class:`Trainer` it is built on, EMA, optimisers, checkpoints."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cdlm.training.trainer import StepStats, Trainer

_TRAINER = ("StepStats", "Trainer")


def __getattr__(name: str) -> Any:
    # The trainer pulls in Accelerate and the data pipeline; load it on first use, so that importing a light
    # submodule (cdlm.training.checkpoint) stays light and free of import cycles.
    if name in _TRAINER:
        return getattr(import_module("cdlm.training.trainer"), name)
    raise AttributeError(f"module 'cdlm.training' has no attribute {name!r}")


__all__ = ["StepStats", "Trainer"]
