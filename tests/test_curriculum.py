"""``cdlm distill``: rounds of progressive distillation from a tiny teacher, each from the previous round's EMA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cdlm
from cdlm.curriculum import curriculum, plan
from cdlm.errors import RecipeError
from test_cli import cdlm_cli
from tiny import SMALL_BPE

TINY = [
    "train.batch_size=4",
    "data.max_rows=40",
    *SMALL_BPE,
    "model.depth=1",
    "model.hidden_size=32",
    "model.max_length=16",
]
SHORT = [*TINY, "data.seq_len=16", "train.log_every=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "elf"
    # the teacher: elf-tiny without its masked-LM encoder stage (tests/plugins/elf/test_encoder_pretraining.py)
    cdlm.train(cdlm.load_recipe("elf-tiny", [*SHORT, "stages=[]", "train.steps=3", "train.save_every=3"]), run)
    return run


def test_curriculum_halves_steps_and_keeps_teacher_resolution() -> None:
    stages = curriculum(16, 4, 5)
    assert [s["name"] for s in stages] == [f"round{k + 1}_{16 >> k}step" for k in range(5)]
    pairs = [
        (s["overrides"]["model"]["distill"]["steps"], s["overrides"]["model"]["distill"]["teacher_steps"])
        for s in stages
    ]
    assert pairs == [(16, 4), (8, 8), (4, 16), (2, 32), (1, 64)]
    assert [s["overrides"]["sample"]["steps"] for s in stages] == [16, 8, 4, 2, 1]
    with pytest.raises(RecipeError, match="--rounds 6: expected 1 to 5 rounds"):
        curriculum(16, 4, 6)


def test_plan_from_the_recipe_sets_the_teacher(teacher: Path) -> None:
    config = plan(teacher, rounds=2, recipe="elf-tiny-pd", overrides=SHORT)
    assert [s.name for s in config.stages] == ["round1_16step", "round2_8step"]
    assert config.model.distill.teacher == str(teacher)
    with pytest.raises(RecipeError, match="the recipe has 5 rounds"):
        plan(teacher, rounds=7, recipe="elf-tiny-pd")


def test_cdlm_distill_trains_rounds_and_samples(teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "pd"
    # lr 1e-30: the rounds' updates vanish in fp32 rounding, so each round's weights are the weights it started from
    sets = [a for s in [*SHORT, "train.steps=2", "train.save_every=2", "train.lr=1e-30"] for a in ("--set", s)]
    done = cdlm_cli("distill", "--teacher", str(teacher), "--rounds", "2", *sets, "-o", str(out))
    assert done.returncode == 0, done.stderr
    second = out / "round2_8step"
    assert "round2_8step" in done.stderr and (second / "checkpoints").is_dir()
    # round 1 starts from the teacher's EMA, round 2 from round 1's EMA (spec §8)
    teacher_ema = load_file(next((teacher / "checkpoints").iterdir()) / "ema.safetensors")
    teacher_raw = load_file(next((teacher / "checkpoints").iterdir()) / "model.safetensors")
    first = load_file(next((out / "round1_16step" / "checkpoints").iterdir()) / "model.safetensors")
    assert all(torch.equal(first[k], v) for k, v in teacher_ema.items())
    assert any(not torch.equal(teacher_raw[k], v) for k, v in teacher_ema.items())  # EMA and raw do differ
    round1_ema = load_file(next((out / "round1_16step" / "checkpoints").iterdir()) / "ema.safetensors")
    start2 = load_file(next((second / "checkpoints").iterdir()) / "model.safetensors")
    assert all(torch.equal(start2[k], v) for k, v in round1_ema.items())
    loaded = cdlm.load_pretrained(second)
    assert (loaded.config.model.distill.steps, loaded.config.sample.steps) == (8, 8)
    samples = cdlm.sample(loaded, overrides=["sample.num_samples=2"])
    assert len(samples) == 2
