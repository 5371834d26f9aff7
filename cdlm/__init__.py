"""cdlm: continuous diffusion language models (ELF, Cola DLM) on one core.

The public API::

    import cdlm
    config = cdlm.load_recipe("elf-tiny", ["train.steps=100"])
    cdlm.train(config, "runs/elf-tiny")
    for s in cdlm.sample("runs/elf-tiny", overrides=["sample.num_samples=2"]):
        print(s.text)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from cdlm import recipes
from cdlm.config import RunConfig
from cdlm.errors import CdlmError
from cdlm.recipes import list_recipes, load_recipe

if TYPE_CHECKING:
    from cdlm.api import (
        Pretrained,
        Sample,
        build,
        convert,
        from_pretrained,
        load_pretrained,
        sample,
        save_pretrained,
        train,
    )

_RUNS = (
    "Pretrained",
    "Sample",
    "build",
    "convert",
    "from_pretrained",
    "load_pretrained",
    "sample",
    "save_pretrained",
    "train",
)


def __getattr__(name: str) -> Any:
    # The run API pulls in datasets and transformers; load it on first use so `cdlm recipes` starts fast.
    if name in _RUNS:
        return getattr(import_module("cdlm.api"), name)
    raise AttributeError(f"module 'cdlm' has no attribute {name!r}")


__all__ = [
    "CdlmError",
    "Pretrained",
    "RunConfig",
    "Sample",
    "build",
    "convert",
    "from_pretrained",
    "list_recipes",
    "load_pretrained",
    "load_recipe",
    "recipes",
    "sample",
    "save_pretrained",
    "train",
]
