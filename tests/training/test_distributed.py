"""Two processes on the CPU (gloo): DDP and FSDP2 equal one process; kill -9 and FSDP resumes continue exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from torch import nn

import cdlm
from cdlm.config import RunConfig
from cdlm.errors import TrainingError
from cdlm.interfaces import MethodSpec
from cdlm.registry import get_method
from cdlm.training.checkpoint import CheckpointState, load_checkpoint
from cdlm.training.distributed import TrainingModule, make_accelerator
from cdlm.training.loop import train
from toy_plugin.register import TESTS_ROOT, TOY_ROOT, random_rows, register_toy

WORKER = """
import json, sys, time, torch
import cdlm_toy
from accelerate.state import AcceleratorState
from cdlm.config import RunConfig
from cdlm.training.distributed import shutdown
from toy_plugin.register import random_rows
from cdlm.training.loop import train
raw = json.loads(sys.argv[1])
cfg = RunConfig(**{**raw, "model": cdlm_toy.ToyConfig(**raw["model"])})
torch.manual_seed(0)
slow = float(sys.argv[3])
train(cfg, cdlm_toy.build(cfg), sys.argv[2], random_rows(), on_log=lambda r: time.sleep(slow))
if AcceleratorState().is_main_process:  # one line: two processes writing to one log would interleave
    print(f"distributed_type: {AcceleratorState().distributed_type.value}")
shutdown()
"""


# FSDP2 as accelerate launch sets it from a config file; the toy's nn.Linear layers are its units (a recipe's
# are its blocks), so parameters are sharded across several units, each gathered for its own forward.
FSDP = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "Linear",
}


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


def launch(
    tmp_path: Path, cfg: RunConfig, run_dir: Path, *, sleep: float = 0.0, launch_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``cfg`` on 2 processes with torch.distributed.run (gloo on the CPU), in a new process group.

    ``launch_env`` adds environment variables, as ``accelerate launch`` sets them from a config file.
    """
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    paths = [str(TOY_ROOT), str(TESTS_ROOT), str(tmp_path / "toy-site"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", **(launch_env or {})}
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


def run_two(tmp_path: Path, cfg: RunConfig, run_dir: Path, launch_env: dict[str, str] | None = None) -> None:
    proc = launch(tmp_path, cfg, run_dir, launch_env=launch_env)
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
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version=1"),
        ({**FSDP, "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params=true"),
        ({**FSDP, "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "fsdp_auto_wrap_policy=SIZE_BASED_WRAP"),
        ({**FSDP, "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}, "fsdp_state_dict_type=SHARDED_STATE_DICT"),
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


def test_the_launch_configs_ship_with_the_recipes() -> None:
    ddp = load_config_from_file(str(files("cdlm_recipes") / "accelerate" / "ddp.yaml"))
    assert ddp.distributed_type.value == "MULTI_GPU" and ddp.mixed_precision == "no"
    fsdp = load_config_from_file(str(files("cdlm_recipes") / "accelerate" / "fsdp.yaml"))
    assert fsdp.distributed_type.value == "FSDP" and fsdp.mixed_precision == "no"
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_reshard_after_forward"] is True
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "NO_WRAP"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_fsdp_units_are_the_blocks_a_network_repeats() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.heads = nn.ModuleList([nn.Linear(4, 2)])  # leaves, not blocks: never a unit of their own

    method = SimpleNamespace(trainable={"net": Net()}, objective=None)
    assert TrainingModule(method).block_classes() == ["Block"]


@pytest.mark.slow
def test_fsdp_on_two_processes_equals_one_and_resumes_exactly(toy: MethodSpec, tmp_path: Path) -> None:
    one = config(toy, grad_accum=2, keep_last=3)  # the same global batch as 2 processes × 1 micro-batch
    torch.manual_seed(0)
    train(one, toy.build(one), tmp_path / "one", random_rows())
    two = config(toy, keep_last=3)
    units = {"full": {"FSDP_RESHARD_AFTER_FORWARD": "true"}, "grad_op": {"FSDP_RESHARD_AFTER_FORWARD": "false"}}
    for name, launch_env in {**units, "one_unit": {"FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}}.items():
        run_two(tmp_path, two, tmp_path / name, {**FSDP, **launch_env})
        assert "distributed_type: FSDP" in (tmp_path / f"{name}.log").read_text()  # sharded, not DDP
        a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / name)
        assert b.step == 6
        torch.testing.assert_close(losses(tmp_path / name), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
        opt_a, opt_b = flat_optimizer(a), flat_optimizer(b)
        for label, sa, sb in (
            ("model", a.model_state, b.model_state),
            ("ema", a.ema_state, b.ema_state),
            ("optimizer", opt_a, opt_b),
        ):
            assert sa.keys() == sb.keys(), label
            for key in sa:  # full tensors in the checkpoint, as one process writes them
                torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-6, msg=f"{name} {label}[{key}]")

    resumed = tmp_path / "resumed"  # the full-shard run as if stopped after its step-2 checkpoint
    shutil.copytree(tmp_path / "full", resumed)
    for step in (4, 6):
        shutil.rmtree(resumed / "checkpoints" / f"step-{step:08d}")
    run_two(tmp_path, two, resumed, FSDP)
    b, c = load_checkpoint(tmp_path / "full"), load_checkpoint(resumed)
    for label, sb, sc in (
        ("model", b.model_state, c.model_state),
        ("ema", b.ema_state, c.ema_state),
        ("optimizer", flat_optimizer(b), flat_optimizer(c)),
    ):
        assert sb.keys() == sc.keys() and all(torch.equal(sb[k], sc[k]) for k in sb), label
    assert c.rng_state == b.rng_state and losses(resumed) == losses(tmp_path / "full")


UNUSED = """
import json, torch
from types import SimpleNamespace
from cdlm.config import TrainConfig
from cdlm.training.distributed import make_accelerator, prepare, shutdown
from cdlm.training.sharding import full_tensor
torch.manual_seed(0)
net = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4), "b": torch.nn.Linear(4, 4)})
accelerator = make_accelerator(TrainConfig(precision="fp32"), None)
rank = accelerator.process_index
def objective(x, generator):  # process 1 leaves net.b out of its loss
    h = net["a"](x)
    return SimpleNamespace(loss=(net["b"](h) if rank == 0 else h).square().mean(), metrics={})
method = SimpleNamespace(trainable={"net": net}, objective=objective)
module, _ = prepare(accelerator, method, torch.optim.SGD(net.parameters(), lr=0.1))
loss, _ = module(torch.randn(3, 4, generator=torch.Generator().manual_seed(rank)), None)
accelerator.backward(loss)
grads = {n: full_tensor(p.grad).tolist() for n, p in net.named_parameters()}  # every process gathers
if rank == 0:
    print(accelerator.distributed_type.value, json.dumps(grads))
shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("launch_env", [{}, {**FSDP, "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}], ids=["ddp", "fsdp"])
def test_a_parameter_one_process_leaves_out_gets_the_mean_gradient(tmp_path: Path, launch_env: dict) -> None:
    script = tmp_path / "unused.py"
    script.write_text(UNUSED, encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **launch_env}
    done = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    kind, grads = done.stdout.strip().splitlines()[-1].split(" ", 1)
    assert kind == ("FSDP" if launch_env else "MULTI_CPU")
    torch.manual_seed(0)  # the same gradients on one process: process 0's loss with b, process 1's without
    net = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    for rank in (0, 1):
        h = net["a"](torch.randn(3, 4, generator=torch.Generator().manual_seed(rank)))
        ((net["b"](h) if rank == 0 else h).square().mean() / 2).backward()
    expected = {n: p.grad.tolist() for n, p in net.named_parameters()}
    for name, grad in json.loads(grads).items():
        torch.testing.assert_close(torch.tensor(grad), torch.tensor(expected[name]), msg=name)


def flat_optimizer(ckpt: CheckpointState) -> dict[str, torch.Tensor]:
    """The optimizer state's tensors, keyed ``{param index}.{name}``."""
    state = ckpt.optimizer_state["state"]
    return {f"{i}.{k}": v for i, entry in state.items() for k, v in entry.items() if isinstance(v, torch.Tensor)}


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


@pytest.mark.slow
def test_the_shipped_fsdp_config_trains_a_recipe_that_one_process_samples(tmp_path: Path) -> None:
    run_dir, config_file = tmp_path / "run", files("cdlm_recipes") / "accelerate" / "fsdp.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    cmd += ["--num_processes", "2", "--main_process_port", str(free_port()), "-m", "cdlm.cli", "train"]
    cmd += ["--recipe", "elf-tiny", "-o", str(run_dir), "--set", "train.steps=2", "--set", "train.save_every=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(run_dir / "encoder").step == 2  # one unit trains any stage
    ckpt = load_checkpoint(run_dir / "flow")
    assert ckpt.step == 2 and len(ckpt.rng_state) == 2
    unsharded = cdlm.build(cdlm.load_recipe("elf-tiny")).modules().state_dict()  # full shapes, as saved
    assert {k: v.shape for k, v in ckpt.model_state.items()} == {k: v.shape for k, v in unsharded.items()}
    samples = cdlm.sample(run_dir, overrides=["sample.num_samples=1", "sample.steps=2"])  # here: one process
    assert len(samples) == 1 and len(samples[0].ids) > 0


@pytest.mark.slow
def test_per_block_units_refuse_an_objective_that_reads_a_block_outside_its_forward(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "cdlm.cli", "train", "--recipe", "elf-tiny", "--stage", "encoder", "-o", str(tmp_path / "run")]
    blocks = {k: v for k, v in FSDP.items() if k != "FSDP_TRANSFORMER_CLS_TO_WRAP"}  # TrainingModule's: T5Block
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **blocks}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: FSDP: the objective reads a block's weights outside that block's forward" in done.stderr
    assert "fsdp_auto_wrap_policy: NO_WRAP" in done.stderr
