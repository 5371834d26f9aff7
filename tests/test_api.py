"""The run API: deterministic training from a seed, staged runs, loading and sampling errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cdlm
from cdlm.data.pack import prepare
from cdlm.errors import CheckpointError, DataError, RecipeError
from tiny import SMALL_BPE

# elf-tiny without its masked-LM encoder stage (tests/plugins/elf/test_encoder_pretraining.py covers it)
QUICK = [
    *["stages=[]", "train.steps=2", "train.batch_size=4", "train.save_every=2", "data.max_rows=40", "model.depth=1"],
    *SMALL_BPE,
]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "checkpoints").iterdir()) / "model.safetensors")


def test_training_is_deterministic_from_the_seed(tmp_path: Path) -> None:
    config = cdlm.load_recipe("elf-tiny", QUICK)
    cdlm.train(config, tmp_path / "a")
    cdlm.train(config, tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cdlm.train(cdlm.load_recipe("elf-tiny", [*QUICK, "seed=1"]), tmp_path / "c")
    assert not torch.equal(weights(tmp_path / "c")["network.time_tokens"], a["network.time_tokens"])


def test_staged_run_starts_each_stage_from_the_previous(tmp_path: Path) -> None:
    recipe = tmp_path / "staged.yaml"
    recipe.write_text(
        "extends: elf-tiny\nstages:\n  - {name: first, overrides: {train: {lr: 1.0e-3}}}\n"
        "  - {name: second, overrides: {train: {lr: 2.0e-3}}}\n"
    )
    run = tmp_path / "run"
    config = cdlm.load_recipe(str(recipe), QUICK[1:])  # the file's own stages
    first = cdlm.train(config, run, stage="first")
    assert first.checkpoint is not None and not (run / "second").exists()
    second = cdlm.train(config, run, stage="second")
    assert second.checkpoint is not None and second.checkpoint.parent.parent == run / "second"
    recorded = cdlm.load_recipe(str(run / "second" / "config.yaml"))
    assert recorded.train.init_from == str(run / "first") and recorded.train.lr == 2e-3
    loaded = cdlm.load_pretrained(run, device="cpu")  # a staged run resolves to its last trained stage
    assert loaded.checkpoint == second.checkpoint
    with pytest.raises(cdlm.CdlmError, match="--stage third: the recipe has no stage 'third'"):
        cdlm.train(config, run, stage="third")


def test_sampling_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cdlm.train(cdlm.load_recipe("elf-tiny", QUICK), run)
    with pytest.raises(DataError, match="the list is empty"):
        cdlm.sample(run, prompts=[])
    (run / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        cdlm.load_pretrained(run)
    with pytest.raises(CheckpointError, match="needs a pretrained data.tokenizer"):
        cdlm.load_pretrained(cdlm.load_recipe("elf-tiny"))


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="data.vocab_size: 600 tokens for a trained BPE exceed model.vocab_size 512"):
        cdlm.load_recipe("elf-tiny", [*QUICK, "data.vocab_size=600"])  # a BPE's size is known from the recipe
    wide = ["data.vocab_size=600", "model.vocab_size=600", "model.encoder.vocab_size=601"]  # 601: [MASK]
    bpe = prepare(cdlm.load_recipe("elf-tiny", [*QUICK, *wide]).data, tmp_path).tokenizer  # 600 tokens
    bpe.save_pretrained(tmp_path / "tokenizer")
    config = cdlm.load_recipe("elf-tiny", [*QUICK, f"data.tokenizer={tmp_path / 'tokenizer'}"])
    with pytest.raises(DataError, match="the tokenizer has 600 tokens but the model reads 512 ids"):
        cdlm.train(config, tmp_path / "run")  # a pretrained tokenizer's size is known once it is read


def test_resume_may_change_how_rows_are_made_but_not_which(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cdlm.train(cdlm.load_recipe("elf-tiny", QUICK), run)
    cdlm.train(cdlm.load_recipe("elf-tiny", [*QUICK, "data.num_proc=1", f"data.cache_dir={tmp_path / 'c'}"]), run)
    with pytest.raises(cdlm.CdlmError, match=r"data.max_rows: 40 → 41"):
        cdlm.train(cdlm.load_recipe("elf-tiny", [*QUICK, "data.max_rows=41"]), run)
