"""The `cdlm` command: help, recipes, clear errors (exit 2), and a train → sample round trip equal to the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import cdlm
from tiny import SMALL_BPE

# elf-tiny without its masked-LM encoder stage (tests/plugins/elf/test_encoder_pretraining.py covers it)
TINY = [
    "stages=[]",
    "train.steps=4",
    "train.batch_size=4",
    "train.log_every=2",
    "train.save_every=2",
    "data.max_rows=60",
    *SMALL_BPE,
]


def cdlm_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cdlm.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def test_help_lists_the_commands() -> None:
    out = cdlm_cli("--help")
    assert out.returncode == 0
    for command in ("train", "sample", "recipes"):
        assert command in out.stdout


def test_recipes_list_and_show() -> None:
    listed = cdlm_cli("recipes", "list")
    assert listed.returncode == 0 and "elf-105m" in listed.stdout and "elf-tiny" in listed.stdout
    shown = cdlm_cli("recipes", "show", "elf-105m", "--set", "train.lr=1e-3")
    assert shown.returncode == 0
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["model"]["depth"] == 12 and resolved["train"]["lr"] == 1e-3
    assert resolved == yaml.safe_load(cdlm.recipes.to_yaml(cdlm.load_recipe("elf-105m", ["train.lr=1e-3"])))


def test_bad_recipe_and_bad_override_exit_2_with_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: elf-tiny\ntrain: {stepz: 3}\n")
    out = cdlm_cli("train", "--recipe", str(bad), "-o", str(tmp_path / "run"))
    assert out.returncode == 2
    assert f"{bad}: train.stepz: unknown field; did you mean 'steps'?" in out.stderr
    assert "Traceback" not in out.stderr
    out = cdlm_cli("recipes", "show", "elf-tiny", "--set", "sample.sampler=rk4")
    assert out.returncode == 2 and "--set sample.sampler=rk4: sample.sampler:" in out.stderr


def test_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    out = cdlm_cli("sample", "--checkpoint", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "nowhere: no such file or directory" in out.stderr
    (tmp_path / "empty").mkdir()
    out = cdlm_cli("sample", "--checkpoint", str(tmp_path / "empty"))
    assert out.returncode == 2 and "empty: not a cdlm run or checkpoint directory" in out.stderr
    formats = out.stderr.split("no released layout matches (")[1].split(")")[0].split(", ")
    assert {"cola-official", "elf-official"} <= set(formats)


@pytest.mark.slow
def test_train_then_sample_round_trip_matches_the_api(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [arg for item in TINY for arg in ("--set", item)]
    trained = cdlm_cli("train", "--recipe", "elf-tiny", *sets, "-o", str(run))
    assert trained.returncode == 0, trained.stderr
    assert (run / "config.yaml").is_file() and (run / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]

    out = tmp_path / "samples.jsonl"
    sampled = cdlm_cli("sample", "-c", str(run), "--num-samples", "3", "--steps", "4", "--seed", "7", "-o", str(out))
    assert sampled.returncode == 0, sampled.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(isinstance(r["text"], str) for r in records)

    api = cdlm.sample(run, overrides=["sample.num_samples=3", "sample.steps=4", "sample.seed=7"])
    assert [s.ids for s in api] == [r["ids"] for r in records]
    assert [s.text for s in api] == [r["text"] for r in records]

    plain = cdlm_cli("sample", "-c", str(run), "--num-samples", "3", "--steps", "4", "--seed", "7")
    assert plain.returncode == 0 and plain.stdout.strip() == "\n\n".join(r["text"] for r in records).strip()


def test_sample_from_a_recipe_that_loads_released_weights(tmp_path: Path) -> None:
    from conftest import shared_path

    fixtures = shared_path("fixtures", "cola")
    recipe = tmp_path / "cola-release.yaml"
    recipe.write_text(
        "method: cola\n"
        f"model: {{pretrained_dit: {fixtures / 'cola_dit'}, pretrained_vae: {fixtures / 'cola_vae'}, "
        "pad_id: 3, eos_id: 0, im_end_id: 2, per_sample_noise_seed: 66}\n"
        f"data: {{tokenizer: {fixtures / 'tokenizer.json'}}}\n"
        "sample: {sampler: euler, grid: uniform, steps: 16, guidance: 7.0, max_new_tokens: 8,"
        " repetition_penalty: 1.1}\n"
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The cat sat on"}\n{"prompt": "Once upon a time there was a"}\n')
    out = tmp_path / "out.jsonl"
    done = cdlm_cli("sample", "--recipe", str(recipe), "--prompts-file", str(prompts), "-o", str(out))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    api = cdlm.sample(cdlm.load_recipe(str(recipe)), prompts=["The cat sat on", "Once upon a time there was a"])
    assert [r["ids"] for r in records] == [s.ids for s in api] and len(records) == 2
    assert [r["prompt"] for r in records] == ["The cat sat on", "Once upon a time there was a"]
    both = cdlm_cli("sample", "--recipe", str(recipe), "--checkpoint", str(tmp_path))
    assert both.returncode == 2 and "exactly one of --checkpoint PATH_OR_HUB_ID" in both.stderr
