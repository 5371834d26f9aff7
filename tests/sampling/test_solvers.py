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
    with pytest.raises(ValueError, match="strictly increasing"):
        integrate(decay, torch.ones(1, 1, 1), torch.tensor([0.0, 0.3, 0.3, 1.0]), method="heun")


def test_a_repeated_time_is_a_zero_length_euler_step() -> None:
    """Drawn sub-step times can tie in fp32 (progressive distillation's teacher grids): the step leaves z."""
    z = torch.ones(2, 1, 1)
    tied = integrate(decay, z, torch.tensor([[0.0, 0.3, 0.3, 1.0], [0.0, 0.2, 0.5, 1.0]]), last_step="same")
    untied = integrate(decay, z[:1], torch.tensor([0.0, 0.3, 1.0]), last_step="same")
    torch.testing.assert_close(tied.z[:1], untied.z)  # (the zero step's x̂ only feeds self-conditioning)
    assert tied.nfe == 3


MU, TAU, S = 0.7, 0.5, 2.0  # Gaussian data N(μ, τ²), noise scale s: the x-prediction flow is exactly solvable


def gaussian_x(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
    """E[x | z_t] on z_t = t·x + (1 − t)·s·ε; its ODE maps z₀ = s·ε₀ to z₁ = μ + τ·ε₀ (the monotone Gaussian map)."""
    t = t[:, None, None].double()
    var = t**2 * TAU**2 + (1 - t) ** 2 * S**2
    x = (MU + t * TAU**2 / var * (z.double() - t * MU)).float()
    v = (x - z) / (1 - t.float()).clamp_min(1e-12)
    return Prediction(x=x, v=v)


def on_gaussian_map(t: float) -> float:
    """The exact state at t of the trajectory through z₀ = 1.3: tμ + √(t²τ² + (1 − t)²s²)·1.3/s."""
    return t * MU + math.sqrt(t**2 * TAU**2 + (1 - t) ** 2 * S**2) * 1.3 / S


@pytest.mark.parametrize(("method", "order", "first"), [("euler", 1, 8), ("midpoint", 2, 8), ("dpm2m", 2, 64)])
def test_convergence_order_on_the_gaussian_x_prediction_flow(method: str, order: int, first: int) -> None:
    """Integrate [0.1, 0.9] (the step to t = 1 jumps to x̂ whatever the solver) on uniform grids of n = first … 8·first.

    DPM-Solver++(2M) steps in λ = log(t/(1 − t)): uniform t-steps are far from uniform in λ, so its second order
    shows from n ≈ 64 on. The midpoint rule gains an order on this flow (its leading error term cancels): ≥ 2.
    """
    z0 = torch.full((1, 1, 1), on_gaussian_map(0.1))
    grids = [
        torch.linspace(0.1, 0.9, n + 1, dtype=torch.float64).float() for n in (first, 2 * first, 4 * first, 8 * first)
    ]
    z = [integrate(gaussian_x, z0, g, method=method, last_step="same").z.double().item() for g in grids]
    errors = [abs(v - on_gaussian_map(0.9)) for v in z]
    orders = [round(math.log2(a / b)) for a, b in pairwise(errors)]
    assert orders == [order] * 3 if method != "midpoint" else min(orders) >= order


def test_midpoint_convergence_order_on_decay() -> None:
    errors = [
        (integrate(decay, torch.ones(1, 1, 1), uniform(n), method="midpoint", last_step="same").z - math.exp(-1))
        .abs()
        .item()
        for n in (4, 8, 16, 32)
    ]
    assert [round(math.log2(a / b)) for a, b in pairwise(errors)] == [2] * 3


def test_per_row_grid_equals_rows_integrated_alone() -> None:
    grid = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.35, 0.7, 0.9]])
    z0 = torch.randn(2, 3, 1, generator=torch.Generator().manual_seed(0))
    for method in ("euler", "heun", "midpoint", "dpm2m"):
        both = integrate(gaussian_x, z0, grid, method=method, last_step="same")
        for row in range(2):
            alone = integrate(gaussian_x, z0[row : row + 1], grid[row], method=method, last_step="same")
            torch.testing.assert_close(both.z[row : row + 1], alone.z, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="per-row grid"):
        integrate(decay, z0, grid, method="sde", generator=torch.Generator())
