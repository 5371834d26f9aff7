"""ColaSchedule: the one conversion between Cola's time convention and the core's (spec §5)."""

from __future__ import annotations

import torch

from cdlm.sampling import grids
from cdlm_cola.config import ColaConfig
from cdlm_cola.schedule import ColaSchedule, to_cola_time, to_core_time

GEN = torch.Generator().manual_seed(0)
X = torch.randn(3, 5, 8, generator=GEN)
EPS = torch.randn(3, 5, 8, generator=GEN)
OUT = torch.randn(3, 5, 8, generator=GEN)


def test_time_conversion_round_trips_and_scales_to_the_dit_input() -> None:
    t = torch.cat([grids.uniform(16), torch.rand(64, generator=GEN)])
    torch.testing.assert_close(to_core_time(to_cola_time(t)), t, atol=6e-8, rtol=0)  # ≤ 1 ulp at 1
    assert torch.equal(to_core_time(to_cola_time(grids.uniform(16))), grids.uniform(16))  # exact on k/16
    schedule = ColaSchedule(ColaConfig())
    # core 0 (noise) is Cola 1000; core 1 (data) is Cola 0; the uniform core grid is the reference's 1000 → 0
    expected = torch.linspace(1000.0, 0.0, 17)
    assert torch.equal(schedule.model_time(grids.uniform(16)), expected)
    assert torch.equal(ColaSchedule(ColaConfig(time_scale=1.0)).model_time(torch.tensor([0.25])), torch.tensor([0.75]))


def test_interpolation_and_target_are_colas_path() -> None:
    schedule = ColaSchedule(ColaConfig())
    t = torch.tensor([0.0, 0.3, 1.0])
    tau = to_cola_time(t)[:, None, None]
    z = schedule.interpolate(X, EPS, t)
    torch.testing.assert_close(z, (1 - tau) * X + tau * EPS, atol=1e-6, rtol=0)  # z_τ = (1 − τ)z_0 + τ z_1
    assert torch.equal(z[0], EPS[0]) and torch.equal(z[2], X[2])
    assert torch.equal(schedule.target(X, EPS), EPS - X)  # the DiT's target z_1 − z_0


def test_predict_negates_the_velocity_and_recovers_x() -> None:
    schedule = ColaSchedule(ColaConfig())
    t = torch.tensor([0.0, 0.3, 0.9])
    pred = schedule.predict(OUT.double(), X, t)
    assert pred.v.dtype == pred.x.dtype == torch.float32
    assert torch.equal(pred.v, -OUT)
    torch.testing.assert_close(pred.x, X + (1 - t)[:, None, None] * -OUT)
    # at the exact target the clean estimate is the data: z_t + (1 − t)·(x − ε) = x
    z = schedule.interpolate(X, EPS, t)
    torch.testing.assert_close(schedule.predict(schedule.target(X, EPS), z, t).x, X, atol=1e-6, rtol=0)


def test_core_euler_step_is_bitwise_the_reference_update() -> None:
    schedule = ColaSchedule(ColaConfig())
    grid = grids.uniform(16).tolist()
    cola = torch.linspace(1000.0, 0.0, 17)
    for i in (0, 7, 15):
        v = schedule.predict(OUT, X, torch.full((3,), grid[i])).v
        core = X + (grid[i + 1] - grid[i]) * v  # what cdlm.sampling.solvers._euler computes
        reference = X - OUT * ((cola[i] - cola[i + 1]) / 1000.0)  # x ← x − v̂·dt, spec §5
        assert torch.equal(core, reference)


def test_sample_t_draws_cola_time_and_converts() -> None:
    logit = ColaSchedule(ColaConfig(time_distribution="logit_normal", t_loc=1.0, t_scale=0.5))
    t = logit.sample_t(6, torch.Generator().manual_seed(3))
    tau = torch.sigmoid(1.0 + 0.5 * torch.randn(6, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(t, 1 - tau, atol=1e-7, rtol=0)
    uniform = ColaSchedule(ColaConfig(time_distribution="uniform"))
    t = uniform.sample_t(6, torch.Generator().manual_seed(3))
    assert torch.equal(t, 1 - torch.rand(6, generator=torch.Generator().manual_seed(3)))
    assert t.dtype == torch.float32 and ((t > 0) & (t <= 1)).all()
