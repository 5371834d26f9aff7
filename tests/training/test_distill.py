"""The core progressive distillation: sub-step grids, the implied x-target, and the generic objective."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from cdlm.config import RunConfig
from cdlm.interfaces import TokenBatch
from cdlm.registry import get_method
from cdlm.sampling.types import Prediction
from cdlm.training.distill import (
    DistillConfig,
    ProgressiveDistillation,
    Teacher,
    student_times,
    teacher_grid,
    teacher_target,
)
from toy_plugin.register import register_toy


def test_student_span_and_teacher_grid() -> None:
    t_s, t_t = student_times(torch.tensor([0.0, 0.5, 1.0]), steps=4)
    torch.testing.assert_close(t_s, torch.tensor([0.0, 0.375, 0.75]))
    torch.testing.assert_close(t_t - t_s, torch.full((3,), 0.25))
    grid = teacher_grid(t_s, t_t, torch.tensor([[0.5, 0.25], [0.1, 0.9], [0.3, 0.6]]))
    torch.testing.assert_close(grid[0], torch.tensor([0.0, 0.0625, 0.125, 0.25]))
    assert grid.shape == (3, 4) and bool((grid[:, 1:] > grid[:, :-1]).all())
    t_s, t_t = student_times(torch.tensor([0.0, 0.5, 1.0]), steps=1)  # one step: the span ends at the data
    torch.testing.assert_close(t_s, torch.tensor([0.0, 5e-7, 1e-6]))
    assert bool((t_t == 1.0).all())


def test_implied_target_recovers_x_on_a_straight_path() -> None:
    """A teacher that knows x exactly moves z on the straight line to x: the implied target is x for any grid."""
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))

    def oracle(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        return Prediction(x=x, v=(x - z) / (1 - t)[:, None, None])

    z = 0.3 * x + 0.7 * torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    grid = torch.tensor([[0.3, 0.4, 0.45, 0.6], [0.3, 0.31, 0.5, 0.55]])
    torch.testing.assert_close(teacher_target(oracle, z, grid, torch.zeros_like(z)), x, atol=1e-5, rtol=0)


def test_generic_objective_trains_a_four_component_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_toy(tmp_path, monkeypatch)  # the README's example plugin: four components, nothing else
    toy = get_method("toy")
    cfg = toy.config_cls()
    settings = DistillConfig(steps=4, teacher_steps=2)
    method = toy.build(RunConfig(method="toy", model=cfg))
    student, teacher = method.denoiser, toy.build(RunConfig(method="toy", model=cfg)).denoiser
    student.load_state_dict(teacher.state_dict())
    objective = ProgressiveDistillation(method.embedder, student, method.schedule, Teacher(settings, teacher), settings)
    ids = torch.randint(3, cfg.vocab_size, (4, cfg.max_length), generator=torch.Generator().manual_seed(2))
    batch = TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool))
    out = objective(batch, torch.Generator().manual_seed(3))
    out.loss.backward()
    assert out.loss.item() > 0 and all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # frozen
    assert objective(batch, torch.Generator().manual_seed(3)).loss.item() == pytest.approx(out.loss.item())


def test_teacher_must_be_named() -> None:
    with pytest.raises(ValueError, match="model.distill.teacher: not set"):
        Teacher(DistillConfig()).denoiser(torch.device("cpu"))
