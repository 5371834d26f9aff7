"""The paper recipes themselves run: 2 steps on the CPU, a checkpoint, a sample.

elf-105m at its shapes. Offline stand-ins for what needs the hub: a frozen random T5-small-shaped encoder
(``model.encoder.pretrained`` null: the defaults are t5-small's shapes) and a 1,024-token BPE on
``builtin:pydoc`` (the model keeps the paper's 32,100-row vocabulary, so the parameter count is the paper's).
Batch 1 of 1,024 tokens; about 2 minutes on one CPU thread.

cola-2b is the release recipe reduced in depth (2 of 24 DiT layers, 1 of 4 VAE encoder and decoder blocks) and
in vocabulary (the 1,024-token BPE instead of OLMo 2's 100,278 rows: at full vocabulary the embedding and head
alone hold 308 M parameters, and one layer deep the run took 2 minutes at a 12.7 GB peak with an 8 GB
checkpoint). Everything else is the recipe's: widths, heads, block size 16, 512-token rows, the joint stage with
its frozen reference VAE, AdamW, EMA. Batch 1; about 1 minute, 6 GB peak.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cdlm
from cdlm.training.checkpoint import load_checkpoint

OFFLINE = [
    "model.encoder.pretrained=null",
    "data.source=builtin:pydoc",
    "data.tokenizer=bpe",
    "data.vocab_size=1024",
    "data.max_rows=64",
]
TWO_STEPS = ["train.batch_size=1", "train.grad_accum=1", "train.steps=2", "train.save_every=2", "train.log_every=1"]


@pytest.mark.slow
def test_elf_105m_trains_checkpoints_and_samples(tmp_path: Path) -> None:
    config = cdlm.load_recipe("elf-105m", OFFLINE + TWO_STEPS)
    assert config.model.max_length == config.data.seq_len == 1024
    result = cdlm.train(config, tmp_path / "run")
    assert result.step == 2 and result.stopped is None
    ckpt = load_checkpoint(result.checkpoint)
    trained = sum(v.numel() for k, v in ckpt.ema_state.items())
    assert trained == 104_579_940  # ELF-B (ELF spec §1.1)
    samples = list(cdlm.sample(tmp_path / "run", overrides=["sample.num_samples=1", "sample.steps=2"]))
    assert len(samples) == 1 and len(samples[0].ids) > 0


COLA_OFFLINE = [  # the BPE's own special ids, no chat marker
    "data.source=builtin:pydoc",
    "data.tokenizer=bpe",
    "data.vocab_size=1024",
    "data.max_rows=64",
    "model.pad_id=0",
    "model.eos_id=1",
    "model.im_end_id=null",
]
COLA_REDUCED = [
    "model.dit.num_layers=2",
    "model.vae.encoder_num_blocks=1",
    "model.vae.decoder_num_blocks=1",
    "model.vae.vocab_size=1024",
]
RELEASE_VOCAB, REDUCED_VOCAB = 100_278, 1024


@pytest.mark.slow
def test_cola_2b_reduced_in_depth_trains_checkpoints_and_samples(tmp_path: Path) -> None:
    config = cdlm.load_recipe("cola-2b", COLA_OFFLINE + COLA_REDUCED + TWO_STEPS)
    assert config.data.seq_len == 512 and config.model.stage == "joint" and not config.stages
    assert config.model.dit.block_size == config.model.vae.block_size == 16
    result = cdlm.train(config, tmp_path / "run")
    assert result.step == 2 and result.stopped is None
    ckpt = load_checkpoint(result.checkpoint)
    with torch.device("meta"):
        release = cdlm.build(cdlm.load_recipe("cola-2b", COLA_OFFLINE)).modules().state_dict()
    assert {key.split(".")[0] for key in ckpt.model_state} == {"vae", "dit", "ref_vae"}
    assert {key.split(".")[0] for key in ckpt.ema_state} == {"vae", "dit"}
    for key, value in ckpt.model_state.items():  # every tensor is the release's, but for vocabulary rows
        vocab = RELEASE_VOCAB - REDUCED_VOCAB
        expected = [n - vocab if n in (RELEASE_VOCAB, RELEASE_VOCAB + 1) else n for n in release[key].shape]
        assert list(value.shape) == expected, key
    samples = cdlm.sample(tmp_path / "run", overrides=["sample.num_samples=1", "sample.steps=2"])
    assert len(samples) == 1 and len(samples[0].ids) > 0
