import math
from itertools import pairwise

import pytest
import torch
from torch import Tensor

from cdlm.sampling.grids import uniform
from cdlm.sampling.solvers import integrate
from cdlm.sampling.types import Prediction, StepInfo


def decay(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
    """dz/dt = −z: exactly solvable, z(1) = z(0)·e^{-1}."""
    return Prediction(x=z, v=-z)


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("heun", 2)])
def test_convergence_order(method: str, order: int) -> None:
    errors = [
        (integrate(decay, torch.ones(1, 1, 1), uniform(n), method=method, last_step="same").z - math.exp(-1))
        .abs()
        .item()
        for n in (4, 8, 16, 32)
    ]
    assert [round(math.log2(a / b)) for a, b in pairwise(errors)] == [order] * 3


def test_euler_matches_closed_form() -> None:
    out = integrate(decay, torch.full((2, 3, 4), 2.0), uniform(4))
    torch.testing.assert_close(out.z, torch.full((2, 3, 4), 2.0 * 0.75**4))
    assert out.z.dtype == torch.float32


def counting(calls: list[tuple[int, Tensor]]):
    def predict(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        assert t.shape == (z.shape[0],) and t.dtype == torch.float32
        calls.append((z.shape[0], t.clone()))
        return Prediction(x=z + 1, v=-z)

    return predict


@pytest.mark.parametrize(
    ("method", "last_step", "nfe"),
    [("euler", "euler", 5), ("heun", "euler", 9), ("heun", "same", 10), ("sde", "euler", 5), ("sde", "same", 5)],
)
def test_nfe_is_counted_calls(method: str, last_step: str, nfe: int) -> None:
    calls: list[tuple[int, Tensor]] = []
    out = integrate(
        counting(calls),
        torch.zeros(3, 2, 2),
        uniform(5),
        method=method,
        last_step=last_step,
        churn=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.nfe == len(calls) == nfe


def test_time_is_per_row_fp32() -> None:
    calls: list[tuple[int, Tensor]] = []
    integrate(counting(calls), torch.zeros(3, 2, 2, dtype=torch.float64), uniform(2))
    assert [c[1].tolist() for c in calls] == [[0.0] * 3, [0.5] * 3]


def test_self_conditioning_carry_and_x_init() -> None:
    seen: list[Tensor] = []

    def predict(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        seen.append(x_prev.clone())
        return Prediction(x=torch.full_like(z, float(len(seen))), v=torch.zeros_like(z))

    out = integrate(predict, torch.zeros(1, 1, 1), uniform(3), x_init=torch.full((1, 1, 1), 7.0))
    assert [s.item() for s in seen] == [7.0, 1.0, 2.0] and out.x.item() == 3.0


def test_callback_sees_every_step_and_cannot_change_the_run() -> None:
    grid = uniform(4)
    reference = integrate(decay, torch.ones(2, 3, 1), grid, method="heun")
    infos: list[StepInfo] = []

    def vandal(info: StepInfo) -> None:
        infos.append(info)
        info.z.mul_(0.0)
        info.pred.x.add_(5.0)

    out = integrate(decay, torch.ones(2, 3, 1), grid, method="heun", on_step=vandal)
    torch.testing.assert_close(out.z, reference.z, rtol=0, atol=0)
    torch.testing.assert_close(out.x, reference.x, rtol=0, atol=0)
    assert [i.index for i in infos] == [0, 1, 2, 3]
    assert [(i.t, i.t_next) for i in infos] == list(pairwise(grid.tolist()))
    assert [i.nfe for i in infos] == [2, 4, 6, 7]


def test_sde_without_churn_equals_euler() -> None:
    z0 = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    euler = integrate(decay, z0, uniform(6))
    sde = integrate(decay, z0, uniform(6), method="sde", churn=0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sde.z, euler.z, rtol=0, atol=0)


def test_sde_step_formula_and_draw_order() -> None:
    """One SDE step then the Euler last step, replayed by hand from the same generator."""
    z0 = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    grid = torch.tensor([0.0, 0.2, 1.0])
    gamma, scale = 1.5, 2.0
    seen_t: list[float] = []

    def predict(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        seen_t.append(t[0].item())
        return Prediction(x=0.5 * z, v=-z + t[:, None, None])

    pinned = lambda z: z.index_fill(1, torch.tensor([0]), 0.25)  # noqa: E731
    out = integrate(
        predict,
        z0,
        grid,
        method="sde",
        churn=gamma,
        noise_scale=scale,
        constrain=pinned,
        generator=torch.Generator().manual_seed(3),
    )
    eps = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(3))
    alpha = 1 - gamma * 0.2
    t_b = alpha * 0.0
    z_b = pinned(alpha * z0 + (1 - alpha) * scale * eps)
    z1 = pinned(z_b + (0.2 - t_b) * (-z_b + t_b))
    z2 = pinned(z1 + 0.8 * (-z1 + 0.2))
    torch.testing.assert_close(out.z, z2)
    assert seen_t == pytest.approx([0.0, 0.2])


def test_sde_alpha_is_clipped() -> None:
    """γ·h > 1 backs off all the way to t_b = 0 and pure noise."""
    out = integrate(
        lambda z, t, x: Prediction(x=z, v=torch.ones_like(z)),
        torch.full((1, 2, 2), 9.0),
        torch.tensor([0.0, 0.5, 0.9, 1.0]),
        method="sde",
        churn=4.0,
        noise_scale=0.0,
        generator=torch.Generator(),
    )
    # step 0: z_b = 0 at t_b = 0, z = 0.5; step 1: z_b = 0 at t_b = 0, z = 0.9; last (Euler): 1.0
    torch.testing.assert_close(out.z, torch.ones(1, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "rk4"}, "method='rk4' is unknown"),
        ({"last_step": "ode"}, "last_step='ode' is unknown"),
        ({"churn": -1.0}, "churn must be ≥ 0"),
        ({"method": "sde"}, "needs generator"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        integrate(decay, torch.ones(1, 1, 1), uniform(2), **kwargs)


def test_bad_grid_is_rejected() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        integrate(decay, torch.ones(1, 1, 1), torch.tensor([0.0, 0.6, 0.3, 1.0]))
