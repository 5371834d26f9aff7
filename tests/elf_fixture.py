"""The ELF fixture pack's network configuration as our ElfConfig (shared by the ELF parity tests)."""

from __future__ import annotations

import json
from typing import Any

from cdlm_elf.config import ElfConfig
from conftest import shared_path


def fixture_config(**fields: Any) -> ElfConfig:
    """Translate the reference ``ELF(...)`` kwargs of ``fixtures/elf/elf_config.json``; ``fields`` add or override."""
    ref = json.loads(shared_path("fixtures", "elf", "elf_config.json").read_text())
    network = {
        "max_length": ref["max_length"],
        "latent_dim": ref["text_encoder_dim"],
        "hidden_size": ref["hidden_size"],
        "depth": ref["depth"],
        "num_heads": ref["num_heads"],
        "mlp_ratio": ref["mlp_ratio"],
        "bottleneck_dim": ref["bottleneck_dim"],
        "num_time_tokens": ref["num_time_tokens"],
        "num_self_cond_cfg_tokens": ref["num_self_cond_cfg_tokens"],
        "num_mode_tokens": ref["num_model_mode_tokens"],
        "vocab_size": ref["vocab_size"],
    }
    return ElfConfig(**{**network, **fields})
