"""The public Trainer: its docstring example runs, its steps are the loop's, given batches train like loaded ones."""

from __future__ import annotations

import doctest
import json
import tempfile
from pathlib import Path

import pytest
import torch

from cdlm.data.loader import ResumableLoader
from cdlm.errors import DataError, RecipeError, TrainingError
from cdlm.interfaces import MethodSpec
from cdlm.registry import get_method
from cdlm.training import Trainer, trainer
from cdlm.training.checkpoint import load_checkpoint
from cdlm.training.loop import train
from toy_plugin.register import register_toy
from training.test_faults import build, config, rows

TIMING = ("tokens_per_s", "elapsed_s")


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MethodSpec:
    register_toy(tmp_path, monkeypatch)
    return get_method("toy")


def test_the_docstring_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's mkdtemp() lands in tmp_path
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(Trainer, "Trainer", module=trainer, globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries >= 10
    assert [p.name for p in tmp_path.glob("*/checkpoints/*")] == ["step-00000003"]


def test_steps_and_save_are_the_loops(toy: MethodSpec, tmp_path: Path) -> None:
    cfg = config(toy, steps=4, optimizer="muon", grad_accum=2, warmup_steps=2, lr_schedule="cosine")
    train(cfg, build(toy, cfg), tmp_path / "loop", rows())
    trainer_ = Trainer(cfg, build(toy, cfg), rows(), run_dir=tmp_path / "api")
    seen = [trainer_.step().metrics() for _ in range(4)]
    saved = trainer_.save()
    assert saved == tmp_path / "api" / "checkpoints" / "step-00000004" == trainer_.last_checkpoint
    logged = [json.loads(line) for line in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert seen == [{k: v for k, v in r.items() if k not in TIMING} for r in logged]
    a, b = load_checkpoint(tmp_path / "loop"), load_checkpoint(saved)
    assert a.step == b.step == trainer_.global_step == 4
    for name in ("model_state", "ema_state"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert a.rng_state == b.rng_state and a.loader_state == b.loader_state and a.config_yaml == b.config_yaml
    assert all(torch.equal(v, trainer_.ema.state_dict()[k]) for k, v in b.ema_state.items())


def test_given_batches_train_as_the_loaders_batches(toy: MethodSpec, tmp_path: Path) -> None:
    cfg = config(toy, grad_accum=2)
    drawn = Trainer(cfg, build(toy, cfg), rows())
    expected = [drawn.step().metrics() for _ in range(2)]
    weights = {k: v.clone() for k, v in drawn.model.state_dict().items()}
    slots = [ResumableLoader(rows(), 4, seed=3, process_index=s, num_processes=2) for s in range(2)]  # the same shards
    given = Trainer(cfg, build(toy, cfg), rows())
    assert [given.step([next(loader) for loader in slots]).metrics() for _ in range(2)] == expected
    assert all(torch.equal(weights[k], v) for k, v in given.model.state_dict().items())
    assert [loader.state_dict() for loader in given.loaders] == [{"epoch": 0, "position": 0}] * 2  # not advanced


def test_wrong_inputs_are_refused(toy: MethodSpec, tmp_path: Path) -> None:
    cfg = config(toy, grad_accum=2)
    trainer_ = Trainer(cfg, build(toy, cfg), rows())
    refused = r"expected 2 TokenBatch micro-batch\(es\), one per train.grad_accum slot, got 1 "
    with pytest.raises(DataError, match=refused):
        trainer_.step(next(trainer_.loaders[0]))
    with pytest.raises(TrainingError, match=r"no run directory; pass one, or build the Trainer with run_dir="):
        trainer_.save()
    assert trainer_.global_step == 0 and trainer_.last_checkpoint is None
    with pytest.raises(RecipeError, match="config: expected a RunConfig, got dict"):
        Trainer(cfg.model_dump(), build(toy, cfg), rows())  # type: ignore[arg-type]
