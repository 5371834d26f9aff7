from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cdlm.config import TrainConfig
from cdlm.errors import CheckpointError
from cdlm.training import checkpoint as ckpt_mod
from cdlm.training.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    read_state_dict,
    restore_rng_state,
    save_checkpoint,
)
from cdlm.training.optim import build_lr_schedule, build_optimizer
from conftest import shared_path


def trained_parts(optimizer: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    cfg = TrainConfig(optimizer=optimizer, warmup_steps=2, lr_schedule="cosine", steps=10)
    opt = build_optimizer(model.named_parameters(), cfg)
    sched = build_lr_schedule(opt, cfg)
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def save(run_dir: Path, step: int, model: nn.Module, keep_last: int = 3, **parts: object) -> Path:
    opt, sched = parts.get("opt"), parts.get("sched")
    return save_checkpoint(
        run_dir,
        step,
        model_state=model.state_dict(),
        ema_state={k: v * 2 for k, v in model.state_dict().items()},
        optimizer_state=opt.state_dict() if opt else {"state": {}, "param_groups": []},
        scheduler_state=sched.state_dict() if sched else {},
        loader_state={"epoch": 1, "position": step},
        rng_state=[capture_rng_state({})],
        config_yaml=f"step: {step}\n",
        keep_last=keep_last,
        elapsed_s=1.5,
    )


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_round_trip_restores_everything(tmp_path: Path, optimizer: str) -> None:
    model, opt, sched = trained_parts(optimizer)
    path = save(tmp_path, 2, model, opt=opt, sched=sched)
    assert path == tmp_path / "checkpoints" / "step-00000002" and latest_checkpoint(tmp_path) == path
    state = load_checkpoint(tmp_path)  # a run directory resolves to its latest checkpoint
    assert (state.step, state.elapsed_s, state.loader_state, state.config_yaml) == (
        2,
        1.5,
        {"epoch": 1, "position": 2},
        "step: 2\n",
    )
    for k, v in model.state_dict().items():
        assert torch.equal(state.model_state[k], v) and torch.equal(state.ema_state[k], v * 2)
    fresh, opt2, sched2 = trained_parts(optimizer)
    opt2.load_state_dict(state.optimizer_state)
    sched2.load_state_dict(state.scheduler_state)
    ref, got = opt.state_dict(), opt2.state_dict()
    assert got["param_groups"] == [{**g, "betas": list(g["betas"])} if "betas" in g else g for g in ref["param_groups"]]
    for idx, values in ref["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(got["state"][idx][key]), torch.as_tensor(value)), (idx, key)
    assert sched2.state_dict() == sched.state_dict()


def test_rng_capture_and_restore() -> None:
    gen = torch.Generator().manual_seed(5)
    torch.randn(3)
    record = json.loads(json.dumps(capture_rng_state({"objective": gen})))  # must survive JSON
    expected = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    random.random(), np.random.rand(), torch.rand(9), torch.rand(9, generator=gen)
    restore_rng_state(record, {"objective": gen})
    got = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    with pytest.raises(CheckpointError, match=r"generators \['objective'\], the run has \['other'\]"):
        restore_rng_state(record, {"other": gen})


@pytest.mark.parametrize("where", ["save_file", "replace"])
def test_crash_mid_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    model = nn.Linear(2, 2)
    first = save(tmp_path, 1, model)

    def crash(*args: object) -> None:
        raise KeyboardInterrupt(f"killed during {where}")

    if where == "save_file":  # dies while writing the second file
        real = ckpt_mod.save_file
        calls = iter([real, crash])
        monkeypatch.setattr(ckpt_mod, "save_file", lambda *a, **k: next(calls)(*a, **k))
    else:  # dies right before the rename
        monkeypatch.setattr(ckpt_mod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model)
    monkeypatch.undo()
    leftovers = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert leftovers == [f".tmp-step-00000002-{os.getpid()}", "step-00000001"]
    assert latest_checkpoint(tmp_path) == first and load_checkpoint(first).step == 1
    save(tmp_path, 3, model)  # the next save removes the leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000003"]


def test_keep_last_and_resave(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    for step in range(1, 6):
        save(tmp_path, step, model, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    with torch.no_grad():
        model.weight.add_(1)
    save(tmp_path, 5, model, keep_last=2)
    assert torch.equal(load_checkpoint(tmp_path).model_state["weight"], model.weight)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


def test_missing_and_incomplete_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    path = save(tmp_path, 7, nn.Linear(2, 2))
    (path / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=rf"{path}: incomplete checkpoint, missing ema.safetensors.*rm -r {path}"):
        load_checkpoint(tmp_path)


def test_shared_tensors_are_saved(tmp_path: Path) -> None:
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied
    model = nn.ModuleDict({"emb": emb, "head": head})
    path = save(tmp_path, 1, model)
    state = load_checkpoint(path).model_state
    assert torch.equal(state["emb.weight"], state["head.weight"])


def test_read_state_dict_forms(tmp_path: Path) -> None:
    sd = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"params": sd, "step": 3}, tmp_path / "ckpt.pt")
    (tmp_path / "dir").mkdir()
    save_file(sd, tmp_path / "dir" / "model.safetensors")
    for got in (read_state_dict(tmp_path / "w.safetensors"), read_state_dict(tmp_path / "dir")):
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    raw = read_state_dict(tmp_path / "ckpt.pt")
    assert raw["step"] == 3 and torch.equal(raw["params"]["b"], sd["b"])
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="no such weights file"):
        read_state_dict(tmp_path / "missing.pt")


def test_read_sharded_equals_single() -> None:
    single = read_state_dict(shared_path("fixtures", "cola", "cola_dit"))
    sharded = read_state_dict(shared_path("fixtures", "cola", "cola_dit_sharded"))
    assert sharded.keys() == single.keys() and len(single) > 10
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_sharded_missing_shard_is_named(tmp_path: Path) -> None:
    src = shared_path("fixtures", "cola", "cola_dit_sharded")
    shutil.copy(src / "model.safetensors.index.json", tmp_path)
    shutil.copy(src / "model-00001-of-00002.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="missing from .*: model-00002-of-00002.safetensors"):
        read_state_dict(tmp_path)


def test_read_reference_torch_checkpoint() -> None:
    raw = read_state_dict(shared_path("fixtures", "elf", "ckpt", "checkpoint_1"))
    weights = load_file(shared_path("fixtures", "elf", "model.safetensors"))
    assert raw["params"].keys() == weights.keys() and raw["step"] == 1
