"""Faults and long runs: signals and the time limit save and stop, damaged checkpoints are passed over,
non-finite values stop the run with valid metrics, and resumed runs say so (issue 12)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import cdlm
from cdlm.config import RunConfig
from cdlm.errors import TrainingError
from cdlm.interfaces import LossOutput, Method, MethodSpec
from cdlm.registry import get_method
from cdlm.training.checkpoint import list_checkpoints, load_checkpoint
from cdlm.training.loop import train
from tiny import SMALL_BPE
from toy_plugin.register import random_rows, register_toy


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MethodSpec:
    register_toy(tmp_path, monkeypatch)
    return get_method("toy")


def config(spec: MethodSpec, **train_cfg: Any) -> RunConfig:
    train_cfg = {"steps": 6, "batch_size": 4, "save_every": 100, "log_every": 1, "ema_decay": 0.9, **train_cfg}
    return RunConfig(method="toy", seed=3, model=spec.config_cls(), train=train_cfg)


def build(spec: MethodSpec, cfg: RunConfig) -> Method:
    torch.manual_seed(0)
    return spec.build(cfg)


def rows() -> Any:
    return random_rows()


def strict_json_lines(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file refusing NaN / Infinity, which are not JSON."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{path}: bare {constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_current_step_and_a_rerun_resumes(toy: MethodSpec, tmp_path: Path, sig: int) -> None:
    cfg = config(toy)
    handler = signal.getsignal(sig)

    def send_at_2(record: dict[str, float]) -> None:
        if record["step"] == 2:
            os.kill(os.getpid(), sig)

    stopped = train(cfg, build(toy, cfg), tmp_path, rows(), on_log=send_at_2)
    assert stopped.stopped == signal.Signals(sig).name and stopped.step == 3  # the step under way when it came
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]  # save_every is 100
    assert signal.getsignal(sig) == handler  # the loop's handlers are gone once it returns
    news: list[str] = []
    done = train(cfg, build(toy, cfg), tmp_path, rows(), on_status=news.append)
    assert done.step == 6 and done.stopped is None
    assert any(line.startswith("resumed from step 3") for line in news)


def test_the_time_limit_saves_and_stops(toy: MethodSpec, tmp_path: Path) -> None:
    cfg = config(toy, max_minutes=1e-6)
    result = train(cfg, build(toy, cfg), tmp_path, rows())
    assert result.stopped == "time limit" and result.step == 1
    assert load_checkpoint(tmp_path).step == 1
    assert load_checkpoint(tmp_path).scheduler_state["last_epoch"] == 1  # the schedule still plans for train.steps


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated-model": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:64]),
    "garbage-model": lambda c: (c / "model.safetensors").write_bytes(os.urandom(2048)),
    "missing-ema": lambda c: (c / "ema.safetensors").unlink(),
    "garbage-optimizer": lambda c: (c / "optimizer.safetensors").write_bytes(b"\x00" * 16),
    "bad-trainer-state": lambda c: (c / "trainer_state.json").write_text("{"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(toy: MethodSpec, tmp_path: Path, damage: str) -> None:
    cfg = config(toy, steps=4, save_every=2)
    train(cfg, build(toy, cfg), tmp_path / "straight", rows())
    run = tmp_path / "run"
    train(cfg, build(toy, cfg), run, rows())
    DAMAGE[damage](run / "checkpoints" / "step-00000004")
    longer = config(toy, steps=5, save_every=2)
    news: list[str] = []
    result = train(longer, build(toy, longer), run, rows(), on_status=news.append)
    assert any(line.startswith("warning: ") and "step-00000004" in line for line in news)
    assert any(line.startswith("resumed from step 2") for line in news)
    assert result.step == 5 and [r["step"] for r in strict_json_lines(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    straight = load_checkpoint(tmp_path / "straight")
    redone = load_checkpoint(run / "checkpoints" / "step-00000004")  # the damaged one, rewritten by the rerun
    assert all(torch.equal(straight.model_state[k], redone.model_state[k]) for k in straight.model_state)


def test_a_non_finite_loss_stops_before_the_update(toy: MethodSpec, tmp_path: Path) -> None:
    cfg = config(toy, save_every=2)
    method = build(toy, cfg)
    objective, calls = method.objective, []

    def poisoned(batch: Any, generator: torch.Generator) -> LossOutput:
        out = objective(batch, generator)
        calls.append(1)
        if len(calls) == 3:
            return LossOutput(out.loss * float("nan"), {**out.metrics, "mse": float("inf")})
        return LossOutput(out.loss, {**out.metrics, "mse": float("nan")} if len(calls) == 1 else out.metrics)

    method.objective = poisoned
    with pytest.raises(TrainingError) as raised:
        train(cfg, method, tmp_path, rows())
    message = str(raised.value)
    assert "step 3: non-finite loss" in message and str(tmp_path / "checkpoints" / "step-00000002") in message
    records = strict_json_lines(tmp_path / "metrics.jsonl")  # valid JSON; the NaN metric of step 1 is null
    assert [r["step"] for r in records] == [1, 2] and records[0]["mse"] is None
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path).model_state.values())


def test_an_infinite_learning_rate_is_refused_before_training() -> None:
    with pytest.raises(cdlm.CdlmError, match=r"--set train.lr=.inf: train.lr: input should be a finite number"):
        cdlm.load_recipe("elf-tiny", ["train.lr=.inf"])


def test_threads_follow_the_config(toy: MethodSpec, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        cfg = config(toy, steps=1, num_threads=2)
        train(cfg, build(toy, cfg), tmp_path, rows())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_per_stage_overrides_set_one_stage() -> None:
    cfg = cdlm.load_recipe("cola-tiny", ["stages.vae.train.steps=1350", "stages.joint.train.lr=1e-4"])
    vae, joint = (cdlm.recipes.stage_config(cfg, name) for name in ("vae", "joint"))
    assert vae.train.steps == 1350 and joint.train.steps == 400 and joint.train.lr == 1e-4 and vae.train.lr == 3e-3
    both = cdlm.load_recipe("cola-tiny", ["stages.vae.train.steps=5", "train.steps=9"])  # in order: the last wins
    assert [cdlm.recipes.stage_config(both, n).train.steps for n in ("vae", "joint")] == [9, 9]


@pytest.mark.slow
def test_ctrl_c_on_the_command_saves_and_says_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [
        "train.steps=500",
        "train.batch_size=4",
        "train.log_every=1",
        "train.save_every=1000",
        "data.max_rows=40",
        "model.depth=1",
        "stages=[]",
        *SMALL_BPE,
    ]  # fmt: skip  (one stage: elf-tiny without its masked-LM encoder stage)
    args = ["train", "-r", "elf-tiny", "-o", str(run), *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "err.log", "w") as err:
        child = subprocess.Popen([sys.executable, "-m", "cdlm.cli", *args], env=env, stderr=err, text=True)
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text().strip():
            assert child.poll() is None, (tmp_path / "err.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=60) == 130
    log = (tmp_path / "err.log").read_text()
    assert "Traceback" not in log and "stopped by SIGINT" in log
    step = load_checkpoint(run).step
    assert 1 <= step < 500 and f"checkpoint saved to {run / 'checkpoints' / f'step-{step:08d}'}" in log
    assert "resume with: cdlm train --recipe elf-tiny --set train.steps=500" in log
    assert "train step 1/500" in log  # one plain line per log step without a terminal
