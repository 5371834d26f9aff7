"""The paper recipe itself runs: elf-105m at its shapes trains 2 steps on the CPU, checkpoints and samples.

Offline stand-ins for what needs the hub: a frozen random T5-small-shaped encoder (``model.encoder.pretrained``
null: the defaults are t5-small's shapes) and a 1,024-token BPE on ``builtin:pydoc`` (the model keeps the
paper's 32,100-row vocabulary, so the parameter count is the paper's). Batch 1 of 1,024 tokens; about 2
minutes on one CPU thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest

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
