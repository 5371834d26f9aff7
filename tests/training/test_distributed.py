"""Two processes on the CPU (gloo): DDP through the prepared module equals one process; kill -9 resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from cdlm.config import RunConfig
from cdlm.errors import TrainingError
from cdlm.interfaces import MethodSpec
from cdlm.registry import get_method
from cdlm.training.checkpoint import load_checkpoint
from cdlm.training.distributed import make_accelerator
from cdlm.training.loop import train
from toy_plugin.register import TESTS_ROOT, TOY_ROOT, random_rows, register_toy

WORKER = """
import json, sys, time, torch
import cdlm_toy
from cdlm.config import RunConfig
from cdlm.training.distributed import shutdown
from toy_plugin.register import random_rows
from cdlm.training.loop import train
raw = json.loads(sys.argv[1])
cfg = RunConfig(**{**raw, "model": cdlm_toy.ToyConfig(**raw["model"])})
torch.manual_seed(0)
slow = float(sys.argv[3])
train(cfg, cdlm_toy.build(cfg), sys.argv[2], random_rows(), on_log=lambda r: time.sleep(slow))
shutdown()
"""


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MethodSpec:
    register_toy(tmp_path, monkeypatch)
    return get_method("toy")


def config(spec: MethodSpec, **train_cfg: object) -> RunConfig:
    train_cfg = {"steps": 6, "batch_size": 4, "save_every": 2, "log_every": 1, "ema_decay": 0.5, **train_cfg}
    return RunConfig(method="toy", seed=3, model=spec.config_cls(), train=train_cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, cfg: RunConfig, run_dir: Path, *, sleep: float = 0.0) -> subprocess.Popen:
    """Start ``cfg`` on 2 processes with torch.distributed.run (gloo on the CPU), in a new process group."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    paths = [str(TOY_ROOT), str(TESTS_ROOT), str(tmp_path / "toy-site"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += [
        "--master_port",
        str(free_port()),
        str(script),
        json.dumps(cfg.model_dump(mode="json")),
        str(run_dir),
        str(sleep),
    ]
    log = open(tmp_path / f"{run_dir.name}.log", "w")  # noqa: SIM115 (closed with the process by the caller)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_two(tmp_path: Path, cfg: RunConfig, run_dir: Path) -> None:
    proc = launch(tmp_path, cfg, run_dir)
    assert proc.wait(timeout=300) == 0, (tmp_path / f"{run_dir.name}.log").read_text()[-3000:]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_equal_one_and_kill_9_resumes_exactly(toy: MethodSpec, tmp_path: Path) -> None:
    rows = random_rows()
    one = config(toy, grad_accum=2)  # 1 process × 2 micro-batches of 4 = 2 processes × 1 micro-batch of 4
    torch.manual_seed(0)
    train(one, toy.build(one), tmp_path / "one", rows)
    two = config(toy)
    run_two(tmp_path, two, tmp_path / "two")
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert a.step == b.step == 6
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    for name in ("model_state", "ema_state"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-6, msg=f"{name}[{key}]")

    killed = tmp_path / "killed"
    proc = launch(tmp_path, two, killed, sleep=1.0)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000002").is_dir():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait(timeout=30)
    assert load_checkpoint(killed).step < 6
    run_two(tmp_path, two, killed)
    c = load_checkpoint(killed)
    for name in ("model_state", "ema_state"):
        sb, sc = getattr(b, name), getattr(c, name)
        assert all(torch.equal(sb[k], sc[k]) for k in sb), name
    assert c.rng_state == b.rng_state and c.loader_state == b.loader_state
    assert losses(killed) == losses(tmp_path / "two")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "gradient_accumulation_steps=4"),
        ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "mixed_precision=fp16"),
        ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "mixed_precision=fp8"),
        ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, "dynamo_backend=inductor"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
        ({"ACCELERATE_USE_FSDP": "true"}, "FSDP"),
    ],
)
def test_unsupported_launch_settings_stop_at_start(
    toy: MethodSpec, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(TrainingError, match=named.replace("(", r"\(")):
        make_accelerator(config(toy, precision="fp32").train, "unused")


@pytest.mark.parametrize(("launched", "precision"), [("no", "bf16"), ("fp16", "auto")])
def test_mixed_precision_goes_through_accelerate(
    toy: MethodSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launched: str, precision: str
) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    cfg = config(toy, steps=2, precision=precision)
    torch.manual_seed(0)
    result = train(cfg, toy.build(cfg), tmp_path / "run", random_rows())
    assert result.step == 2 and all(isinstance(x, float) for x in losses(tmp_path / "run"))


def test_the_ddp_launch_config_ships_with_the_recipes() -> None:
    launch_config = load_config_from_file(str(files("cdlm_recipes") / "accelerate" / "ddp.yaml"))
    assert launch_config.distributed_type.value == "MULTI_GPU" and launch_config.mixed_precision == "no"


@pytest.mark.slow
def test_torchrun_runs_a_two_stage_recipe_on_two_cpu_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "cdlm.cli", "train", "--recipe", "cola-tiny", "-o", str(run_dir), "--set", "train.steps=2"]
    cmd += ["--set", "train.save_every=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("vae", "joint"):  # the process group outlives the first stage
        assert len(load_checkpoint(run_dir / stage).rng_state) == 2  # one RNG record per process
