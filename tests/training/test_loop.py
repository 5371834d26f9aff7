from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cdlm.config import RunConfig
from cdlm.interfaces import GenerateRequest, Method, MethodSpec
from cdlm.pipeline import FlowSampleConfig
from cdlm.registry import get_method
from cdlm.training.checkpoint import load_checkpoint
from cdlm.training.loop import train
from toy_plugin.register import TESTS_ROOT, TOY_ROOT, random_rows, register_toy

TIMING = ("tokens_per_s", "elapsed_s")


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MethodSpec:
    register_toy(tmp_path, monkeypatch)
    return get_method("toy")


def make_config(spec: MethodSpec, **train_cfg: Any) -> RunConfig:
    train_cfg = {"steps": 6, "batch_size": 4, "save_every": 3, "log_every": 1, "ema_decay": 0.9, **train_cfg}
    return RunConfig(method="toy", seed=3, model=spec.config_cls(), train=train_cfg)


def build(spec: MethodSpec, cfg: RunConfig, init_seed: int = 0) -> Method:
    method = spec.build(cfg)  # initialised from cfg.seed
    if init_seed:  # other initial weights, so that a resumed run must read every weight from disk
        generator = torch.Generator().manual_seed(init_seed)
        with torch.no_grad():
            for p in method.modules().parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
    return method


def metrics(run_dir: Path, timing: bool = False) -> list[dict[str, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in rec.items() if timing or k not in TIMING} for rec in lines]


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    for name in ("model_state", "ema_state"):
        sa, sb = getattr(ca, name), getattr(cb, name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert ca.rng_state == cb.rng_state and ca.loader_state == cb.loader_state
    assert metrics(a) == metrics(b)


class Crash(Exception):
    pass


def crash_at(step: int) -> Any:
    def hook(record: dict[str, float]) -> None:
        if record["step"] == step:
            raise Crash(f"simulated crash at step {step}")

    return hook


@pytest.mark.parametrize(("optimizer", "grad_accum"), [("muon", 2), ("adamw", 1)])
def test_resume_is_bit_exact(toy: MethodSpec, tmp_path: Path, optimizer: str, grad_accum: int) -> None:
    rows = random_rows()
    cfg = make_config(toy, optimizer=optimizer, grad_accum=grad_accum, warmup_steps=2, lr_schedule="cosine")
    straight = build(toy, cfg)
    train(cfg, straight, tmp_path / "a", rows)
    with pytest.raises(Crash):  # dies after logging step 4; the last checkpoint is step 3
        train(cfg, build(toy, cfg), tmp_path / "b", rows, on_log=crash_at(4))
    assert load_checkpoint(tmp_path / "b").step == 3 and metrics(tmp_path / "b")[-1]["step"] == 4
    resumed = build(toy, cfg, init_seed=99)  # new objects, different init: everything must come from disk
    result = train(cfg, resumed, tmp_path / "b", rows)
    assert result.step == 6 and result.checkpoint == tmp_path / "b" / "checkpoints" / "step-00000006"
    assert_same_run(tmp_path / "a", tmp_path / "b")
    for (name, p), q in zip(straight.modules().named_parameters(), resumed.modules().parameters(), strict=True):
        assert torch.equal(p, q), name
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    assert len({r["lr"] for r in metrics(tmp_path / "b")}) == 5  # a varying schedule, restored too


def test_extending_a_finished_run_equals_the_longer_run(toy: MethodSpec, tmp_path: Path) -> None:
    rows = random_rows()
    cfg = make_config(toy)  # constant LR: the 3-step run is a prefix of the 6-step one
    train(cfg, build(toy, cfg), tmp_path / "a", rows)
    short = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})})
    train(short, build(toy, short), tmp_path / "b", rows)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a dead session logged step 4, never saved it
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")
    train(cfg, build(toy, cfg, init_seed=5), tmp_path / "b", rows)
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_outputs_logging_and_checkpoints(toy: MethodSpec, tmp_path: Path) -> None:
    cfg = make_config(toy, steps=5, log_every=2, save_every=2, keep_last=2, clip_grad_norm=1e-3)
    seen: list[dict[str, float]] = []
    result = train(cfg, build(toy, cfg), tmp_path, random_rows(), on_log=seen.append)
    lines = metrics(tmp_path, timing=True)
    assert [list(r) for r in lines] == [["step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "mse"]] * 3
    assert [r["step"] for r in lines] == [2, 4, 5] and seen == lines and result.metrics == lines[-1]
    assert all(r["grad_norm"] > 1e-3 and r["lr"] == cfg.train.lr for r in lines)  # pre-clip norm is logged
    assert all(abs(r["loss"] - r["mse"]) < 1e-5 for r in lines)  # the toy's one term: its discretizer is fixed
    assert lines[0]["tokens_per_s"] > 0 and lines[0]["elapsed_s"] <= lines[-1]["elapsed_s"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    assert result.step == 5 and result.checkpoint == tmp_path / "checkpoints" / "step-00000005"
    again = train(cfg, build(toy, cfg), tmp_path, random_rows())  # already done
    assert again.step == 5 and again.metrics == lines[-1] and len(metrics(tmp_path)) == 3  # last logged record


def test_frozen_modules_are_saved_not_trained(toy: MethodSpec, tmp_path: Path) -> None:
    cfg = make_config(toy, steps=2)
    method = build(toy, cfg)
    table = method.frozen["embedder"]  # the toy's random embedding table
    before = {k: v.clone() for k, v in table.state_dict().items()}
    train(cfg, method, tmp_path, random_rows())
    assert all(torch.equal(before[k], v) for k, v in table.state_dict().items())
    assert not any(p.requires_grad for p in table.parameters()) and not table.training
    state = load_checkpoint(tmp_path)
    assert torch.equal(state.model_state["embedder.table.weight"], before["table.weight"])
    assert not any(k.startswith("embedder.") for k in state.ema_state)


def test_trained_toy_samples_through_its_pipeline(toy: MethodSpec, tmp_path: Path) -> None:
    cfg = make_config(toy, steps=2)
    method = build(toy, cfg)
    train(cfg, method, tmp_path, random_rows())
    steps: list[int] = []
    out = method.pipeline(
        GenerateRequest(num_samples=2, prompts=None, settings=FlowSampleConfig(steps=4)),
        torch.Generator().manual_seed(0),
        on_step=lambda info: steps.append(info.index),
    )
    assert len(out.ids) == 2 and all(len(row) == 16 for row in out.ids) and out.nfe == 4 and steps == [0, 1, 2, 3]


CHILD = """
import sys, time, torch
torch.set_num_threads(1)
import cdlm_toy
from cdlm.config import RunConfig
from cdlm.training.loop import train
from toy_plugin.register import random_rows
raw = {config!r}
cfg = RunConfig(**{{**raw, "model": cdlm_toy.ToyConfig(**raw["model"])}})
torch.manual_seed(0)
method = cdlm_toy.build(cfg)
train(cfg, method, {run_dir!r}, random_rows(), on_log=lambda r: time.sleep(1.0) if r["step"] > 2 else None)
"""


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(toy: MethodSpec, tmp_path: Path) -> None:
    rows = random_rows()
    cfg = make_config(toy, save_every=2)
    train(cfg, build(toy, cfg), tmp_path / "straight", rows)
    run_dir = tmp_path / "killed"
    code = CHILD.format(config=cfg.model_dump(mode="json"), run_dir=str(run_dir))
    paths = [str(TOY_ROOT), str(TESTS_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "step-00000002").is_dir():
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    assert load_checkpoint(run_dir).step < 6
    train(cfg, build(toy, cfg, init_seed=7), run_dir, rows)
    assert_same_run(tmp_path / "straight", run_dir)
