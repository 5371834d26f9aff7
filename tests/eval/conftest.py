"""Tiny judges built in the test session: a word-level tokenizer and a one-layer GPT-2, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import cdlm
from tiny import SMALL_BPE

WORDS = "the a cat dog sat ran on mat log and it was big small red blue . , is of".split()
EOS = "<|endoftext|>"
VOCAB = {"[UNK]": 0, EOS: 1, **{w: i + 2 for i, w in enumerate(WORDS)}}


def make_judge(directory: Path, *, zero: bool = False, seed: int = 0) -> Path:
    """Save a tiny causal LM judge: GPT-2 (1 layer, width 16) over a 23-word vocabulary; zero weights if asked."""
    tok = Tokenizer(WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="[UNK]")
    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    if zero:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_judge(tmp_path_factory.mktemp("judge"))


@pytest.fixture(scope="session")
def zero_judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_judge(tmp_path_factory.mktemp("zero-judge"), zero=True)


QUICK = [
    *["train.steps=2", "train.batch_size=4", "data.max_rows=40", "train.save_every=2", "train.log_every=1"],
    *SMALL_BPE,
]


@pytest.fixture(scope="session")
def elf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("elf") / "run"
    cdlm.train(cdlm.load_recipe("elf-tiny", QUICK), run)
    return run


@pytest.fixture(scope="session")
def seq2seq_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("s2s") / "run"
    cdlm.train(cdlm.load_recipe("elf-seq2seq-tiny", QUICK), run)
    return run
