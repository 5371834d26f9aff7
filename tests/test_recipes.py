"""Every shipped recipe validates and builds; paper sizes match the spec; tiny recipes train two steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cdlm
from cdlm.recipes import list_names

# Trainable parameters: ELF spec §1.1; Cola spec §1.3 (stage joint trains DiT 1,829,875,728 + VAE 501,871,574;
# stage dit, continued pretraining, the DiT alone).
PAPER_PARAMS = {
    "elf-105m": 104_579_940,
    "elf-342m": 342_540_036,
    "elf-652m": 652_103_332,
    "cola-2b": 2_331_747_302,
    "cola-cpt": 1_829_875_728,
}
TINY = [name for name in list_names() if name.endswith("-tiny")]


@pytest.mark.parametrize("name", list_names())
def test_recipe_validates_and_builds_on_meta(name: str) -> None:
    config = cdlm.load_recipe(name)
    with torch.device("meta"):
        method = cdlm.build(config)
    trainable = sum(p.numel() for module in method.trainable.values() for p in module.parameters())
    assert trainable > 0
    if name in PAPER_PARAMS:
        assert trainable == PAPER_PARAMS[name]
    assert all(p.device.type == "meta" for p in method.modules().parameters())


def test_elf_105m_is_the_paper_configuration() -> None:
    config = cdlm.load_recipe("elf-105m")
    m, t, s = config.model, config.train, config.sample
    assert (m.depth, m.hidden_size, m.num_heads, m.bottleneck_dim, m.max_length) == (12, 768, 12, 128, 1024)
    assert (m.encoder.pretrained, m.latent_std, m.noise_scale, m.t_eps) == ("t5-small", 0.2, 2.0, 0.05)
    assert (m.decoder_prob, m.decoder_noise_scale, m.self_cond_prob) == (0.2, 5.0, 0.5)
    assert (t.optimizer, t.lr, t.ema_decay, t.clip_grad_norm) == ("muon", 2e-3, 0.9999, 1.0)
    assert t.batch_size * t.grad_accum == 512
    assert (s.sampler, s.steps, s.churn, s.self_cond_scale, s.grid) == ("sde", 32, 1.5, 3.0, "logit_normal")


def test_cola_cpt_is_the_continued_pretraining_script() -> None:
    config = cdlm.load_recipe("cola-cpt")  # Cola spec §9.2, cola_cpt.py's defaults ("paper Table 8")
    m, t, d = config.model, config.train, config.data
    assert (m.stage, m.vae_mode, m.padding_loss, m.prompt_block_prob) == ("dit", "sample", "trained", 0.05)
    assert (m.time_distribution, m.t_loc, m.t_scale) == ("logit_normal", 0.0, 1.0)
    assert m.block_sizes is None and m.dit.block_size == 16
    assert (m.pretrained_dit, m.pretrained_vae) == ("hf_models/cola_dlm/cola_dit", "hf_models/cola_dlm/cola_vae")
    assert (t.optimizer, t.lr, t.betas, t.weight_decay, t.clip_grad_norm) == ("adamw", 1.5e-4, (0.9, 0.95), 0.01, 1.0)
    assert (t.warmup_steps, t.lr_schedule, t.lr * t.min_lr_ratio, t.steps) == (5000, "cosine", 1e-5, 1_000_000)
    assert (t.batch_size * t.grad_accum, d.seq_len, t.ema_decay) == (1408, 512, 0.0)


@pytest.mark.parametrize("name", TINY)
def test_tiny_recipe_trains_two_steps(name: str, tmp_path: Path) -> None:
    # the whole pydoc text: a few rows hold too little for elf-tiny's 4096-token BPE
    config = cdlm.load_recipe(name, ["train.steps=2", "train.log_every=1", "train.batch_size=4"])
    result = cdlm.train(config, tmp_path / "run")
    assert result.step == 2 and result.checkpoint is not None
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
