"""The ELF fixture pack's network configuration as our ElfConfig (shared by the ELF parity tests)."""

from __future__ import annotations

import json
from typing import Any

from cdlm_elf.config import ElfConfig, EncoderConfig
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


def objective_config(train: dict[str, Any], **fields: Any) -> ElfConfig:
    """The fixture network plus the objective settings of a case's resolved ``train_config`` (T5 from the pack)."""
    return fixture_config(
        encoder=EncoderConfig(pretrained=str(shared_path("fixtures", "elf", "t5_encoder"))),
        latent_mean=train["latent_mean"],
        latent_std=train["latent_std"],
        noise_scale=train["denoiser_noise_scale"],
        t_eps=train["t_eps"],
        time_schedule=train["time_schedule"],
        p_mean=train["denoiser_p_mean"],
        p_std=train["denoiser_p_std"],
        decoder_prob=train["decoder_prob"],
        decoder_p_mean=train["decoder_p_mean"],
        decoder_p_std=train["decoder_p_std"],
        decoder_noise_scale=train["decoder_noise_scale"],
        self_cond_prob=train["self_cond_prob"],
        self_cond_cfg_min=train["self_cond_cfg_min"],
        self_cond_cfg_max=train["self_cond_cfg_max"],
        label_drop_prob=train["label_drop_prob"],
        **fields,
    )
