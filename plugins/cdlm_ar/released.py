"""The baseline as a plain Hugging Face causal LM directory: ``GPT2LMHeadModel.save_pretrained`` plus tokenizer.

``cdlm convert RUN --to hf-causal-lm DIR`` writes it; ``AutoModelForCausalLM.from_pretrained(DIR)`` (and so
``cdlm eval --judge DIR``) reads it with no cdlm installed, and ``cdlm sample --checkpoint DIR`` reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor
from transformers import GPT2LMHeadModel

from cdlm.errors import CheckpointError
from cdlm.interfaces import ReleasedCheckpoint, ReleasedFormat
from cdlm_ar.config import ArConfig
from cdlm_ar.lm import gpt2

MODULE = "lm"
"""The baseline's one module key in ``Method.modules()``."""


class HfCausalLM(ReleasedFormat):
    """A ``save_pretrained`` GPT-2 directory (``config.json`` with ``model_type: gpt2``, weights, tokenizer)."""

    name: ClassVar[str] = "hf-causal-lm"

    def detect(self, path: Path) -> bool:
        """Return whether ``path`` is a directory whose ``config.json`` describes a GPT-2 model."""
        return path.is_dir() and _hf_config(path).get("model_type") == "gpt2"

    def read(self, path: Path) -> ReleasedCheckpoint:
        """Read the directory: a recipe with its shapes and tokenizer, and the weights under ``lm.``.

        Raises:
            CheckpointError: the weights cannot be loaded; the message names the directory.
        """
        try:
            model = GPT2LMHeadModel.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a loadable GPT-2 save_pretrained directory ({err})") from err
        c = model.config
        model_section = {
            "vocab_size": c.vocab_size,
            "max_length": c.n_positions,
            "hidden_size": c.n_embd,
            "depth": c.n_layer,
            "num_heads": c.n_head,
            "eos_id": c.eos_token_id if c.eos_token_id is not None else 1,
            "pad_id": c.pad_token_id if c.pad_token_id is not None else 0,
        }
        recipe: dict[str, Any] = {
            "method": "ar",
            "model": model_section,
            "data": {"tokenizer": str(path), "seq_len": c.n_positions},
            "sample": {"max_new_tokens": c.n_positions - 1},
        }
        weights = {f"{MODULE}.{k}": v for k, v in model.state_dict().items()}
        return ReleasedCheckpoint(recipe=recipe, weights=weights)

    def write(
        self,
        directory: Path,
        *,
        config: Any,
        weights: Mapping[str, Tensor],
        ema: Mapping[str, Tensor] | None,
        step: int,
        tokenizer: Any,
    ) -> Path:
        """Write the EMA weights (else the raw ones) as a GPT-2 ``save_pretrained`` directory with the tokenizer."""
        cfg: ArConfig = config.model
        model = gpt2(cfg)
        state = {**weights, **(ema or {})}
        model.load_state_dict({k.removeprefix(f"{MODULE}."): v for k, v in state.items() if k.startswith(MODULE)})
        directory = Path(directory)
        model.save_pretrained(str(directory))
        tokenizer.save_pretrained(str(directory))
        return directory


def _hf_config(path: Path) -> dict[str, Any]:
    try:
        found = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}
