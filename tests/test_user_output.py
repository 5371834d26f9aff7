"""What a user sees: readable sample text, Cola text ending at EOS, progress lines without a terminal (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cdlm
from cdlm.cli import progress
from cdlm.interfaces import GenerateOutput, GenerateRequest
from cdlm_cola.config import ColaSampleConfig
from tiny import SMALL_BPE

TINY = ["train.steps=1", "train.batch_size=4", "data.max_rows=40", "model.depth=1", *SMALL_BPE]


def test_sampled_text_has_no_fragments_of_split_characters(tmp_path: Path) -> None:
    cdlm.train(cdlm.load_recipe("elf-tiny", TINY), tmp_path / "run")
    loaded = cdlm.load_pretrained(tmp_path / "run", device="cpu")
    tok = loaded.tokenizer
    head = tok.convert_tokens_to_ids("Ã")  # the byte 0xC3 alone: the first half of "é" in byte-level BPE
    ids = [*tok.encode("caf", add_special_tokens=False), head]
    assert "\ufffd" in tok.decode(ids)
    loaded.method.pipeline = lambda request, generator, on_step=None: GenerateOutput([ids] * request.num_samples, 0)
    samples = cdlm.sample(loaded, overrides=["sample.num_samples=1"])
    assert samples[0].text == "caf" and samples[0].ids == ids


def test_cola_text_ends_at_the_end_of_text_token(monkeypatch: pytest.MonkeyPatch) -> None:
    method = cdlm.build(cdlm.load_recipe("cola-tiny"))  # eos_id 1
    rows = [[5, 6, 1, 7, 8], [5, 6, 7, 8, 9]]
    monkeypatch.setattr(method.pipeline, "generate_batch", lambda request, batch, *args: (rows[batch], 0))
    settings = ColaSampleConfig(batch_size=2)
    out = method.pipeline(GenerateRequest(2, [[5], [6]], settings), torch.Generator())
    assert out.ids == rows and out.text_ends == [2, 5]


def test_training_progress_without_a_terminal_is_one_line_per_log_step(capsys: pytest.CaptureFixture[str]) -> None:
    with progress.training(10) as hooks:
        hooks.on_stage("vae", 10)
        for step in (5, 10):
            hooks.on_log({"step": step, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 100.0, "elapsed_s": 3.0})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "stage vae: 10 steps"
    assert lines[1].startswith("train vae step 5/10  loss 1.5000") and lines[2].startswith("train vae step 10/10")


def test_sampling_progress_without_a_terminal_is_periodic_lines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # every step reports
    with progress.sampling() as on_step:
        for _ in range(3):
            on_step(None)  # type: ignore[arg-type]  # the plain hook only counts
    lines = capsys.readouterr().err.splitlines()
    assert lines == [*(f"sample: {n} solver steps so far" for n in (1, 2, 3)), "sample: done, 3 solver steps"]
