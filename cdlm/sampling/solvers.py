"""Stateless rectified-flow solvers: a prediction function and a grid go in, the integrated sample comes out.

Every step is a pure function ``(predict, z, t, t_next, x_prev, options) → (z, Prediction)`` listed in
``_STEPS``; a new solver is one function plus one entry. The sampler state stays fp32 whatever the
network computes in, and the number of network evaluations is counted by a wrapper around ``predict``.

A grid is shared by every row (n + 1,) or given per row (B, n + 1): progressive distillation integrates its
teacher over a different sub-interval per row. Times reach a step as a float or as (B,) per-row times.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor

from cdlm.errors import DataError
from cdlm.sampling.grids import check_grid
from cdlm.sampling.types import PredictFn, Prediction, SampleOutput, StepCallback, StepInfo

SolverName = Literal["euler", "heun", "midpoint", "dpm2m", "sde"]
"""The solvers of :func:`integrate` (one function each in ``_STEPS``)."""
LastStep = Literal["euler", "same"]
Time = float | Tensor
"""A time shared by every row, or (B,) fp32 per-row times (a per-row grid)."""


def _identity(z: Tensor) -> Tensor:
    return z


class _Counted:
    """Calls ``predict`` with per-row fp32 times, returns an fp32 Prediction and counts the calls."""

    def __init__(self, predict: PredictFn) -> None:
        self.predict = predict
        self.calls = 0

    def __call__(self, z: Tensor, t: Time, x_prev: Tensor) -> Prediction:
        self.calls += 1
        if isinstance(t, Tensor):
            times = t.to(dtype=torch.float32, device=z.device)  # (B,)
        else:
            times = torch.full((z.shape[0],), t, dtype=torch.float32, device=z.device)  # (B,)
        pred = self.predict(z, times, x_prev)
        return Prediction(x=pred.x.float(), v=pred.v.float())


@dataclass(frozen=True)
class _Options:
    """What the stochastic and constrained steps need beyond the state."""

    churn: float
    noise_scale: float
    generator: torch.Generator | None
    constrain: Callable[[Tensor], Tensor]


Step = Callable[[_Counted, Tensor, "_Interval", Tensor, _Options], tuple[Tensor, Prediction]]


@dataclass(frozen=True)
class _Interval:
    """One grid interval [t, t_next], and the time of the evaluation that produced ``x_prev`` (None: ``x_init``)."""

    t: Time
    t_next: Time
    t_prev: Time | None

    def span(self, like: Tensor) -> float | Tensor:
        """Return ``t_next − t``: a float, or per-row (B, 1, …) broadcast against ``like``."""
        return _per_row(self.t_next - self.t, like)


def _per_row(value: float | Tensor, like: Tensor) -> float | Tensor:
    """Broadcast a (B,) per-row value against a (B, …) tensor; a float stays a float."""
    return value.reshape(-1, *([1] * (like.dim() - 1))) if isinstance(value, Tensor) else value


def _euler(
    predict: _Counted, z: Tensor, step: _Interval, x_prev: Tensor, options: _Options
) -> tuple[Tensor, Prediction]:
    """First order: ``z + (t_next − t)·v̂(z, t)``."""
    pred = predict(z, step.t, x_prev)
    return z + step.span(z) * pred.v, pred


def _heun(
    predict: _Counted, z: Tensor, step: _Interval, x_prev: Tensor, options: _Options
) -> tuple[Tensor, Prediction]:
    """Second order: an Euler predictor, then the average of the slopes at both ends.

    The slope at ``t_next`` sees the predictor's x̂ as its self-conditioning input.
    """
    first = predict(z, step.t, x_prev)
    guess = options.constrain(z + step.span(z) * first.v)
    second = predict(guess, step.t_next, first.x)
    return z + step.span(z) * 0.5 * (first.v + second.v), second


def _midpoint(
    predict: _Counted, z: Tensor, step: _Interval, x_prev: Tensor, options: _Options
) -> tuple[Tensor, Prediction]:
    """Second order (explicit midpoint): a half Euler step, then the full step with the midpoint's slope.

    The midpoint evaluation sees the first x̂ as its self-conditioning input.
    """
    first = predict(z, step.t, x_prev)
    half = options.constrain(z + 0.5 * step.span(z) * first.v)
    second = predict(half, step.t + 0.5 * (step.t_next - step.t), first.x)
    return z + step.span(z) * second.v, second


def _log_snr(t: Time) -> float | Tensor:
    """Return λ = log(t/(1 − t)), the log signal-to-noise ratio of the path up to the constant −log s."""
    if isinstance(t, Tensor):
        return torch.log(t.double()) - torch.log1p(-t.double())
    return math.log(t) - math.log1p(-t) if 0.0 < t < 1.0 else (-math.inf if t <= 0.0 else math.inf)


def _dpm2m(
    predict: _Counted, z: Tensor, step: _Interval, x_prev: Tensor, options: _Options
) -> tuple[Tensor, Prediction]:
    """Second-order multistep for x-prediction flows (DPM-Solver++(2M), Lu et al. 2022, eq. for data prediction).

    On the path ``z_t = t·x + (1 − t)·s·ε`` (α = t, σ = s(1 − t), λ = log(α/σ)) the exact update is
    ``z' = (σ'/σ)·z + α'·(1 − e^{−h})·D`` with h = λ' − λ; D = x̂ is first order (DDIM, equal to Euler here) and
    ``D = (1 + 1/(2r))·x̂ − x̂_prev/(2r)``, r = (λ − λ_prev)/h, reuses the previous step's x̂ (the self-conditioning
    carry) for second order. The first step (no previous x̂), a step from t = 0 and the step to t = 1 are first order.
    """
    pred = predict(z, step.t, x_prev)
    t, t_next = step.t, step.t_next
    keep = _per_row((1 - t_next) / (1 - t), z)  # σ'/σ; t < 1 on every interval
    lam, lam_next = _log_snr(t), _log_snr(t_next)
    finite = lambda v: torch.isfinite(v).all() if isinstance(v, Tensor) else math.isfinite(v)  # noqa: E731
    d = pred.x
    if step.t_prev is not None and finite(lam) and finite(lam_next):
        lam_prev = _log_snr(step.t_prev)
        if finite(lam_prev):
            half_inv_r = 0.5 * (lam_next - lam) / (lam - lam_prev)  # 1/(2r)
            c = _per_row(half_inv_r.float() if isinstance(half_inv_r, Tensor) else half_inv_r, z)
            d = (1 + c) * pred.x - c * x_prev
    # α'(1 − e^{−h}) = t' − t(1 − t')/(1 − t) = (t' − t)/(1 − t): exact, also at t = 0 and t' = 1
    gain = _per_row((t_next - t) / (1 - t), z)
    return keep * z + gain * d, pred


def _sde(predict: _Counted, z: Tensor, step: _Interval, x_prev: Tensor, options: _Options) -> tuple[Tensor, Prediction]:
    """Back off to ``t_b = α·t`` with fresh noise, then take an Euler step to ``t_next`` (ELF spec §4.3).

    ``α = clip(1 − γ·h, 0, 1)`` with γ = churn and h = t_next − t; ``z_b = α·z + (1 − α)·s·ε``, re-constrained.
    The noise is drawn on the generator's device (a CPU generator for reproducible draws), then moved.
    """
    assert options.generator is not None and not isinstance(step.t, Tensor)  # checked by integrate
    t, t_next = step.t, float(step.t_next)
    alpha = min(max(1.0 - options.churn * (t_next - t), 0.0), 1.0)
    t_back = alpha * t
    eps = torch.randn(z.shape, generator=options.generator, dtype=torch.float32, device=options.generator.device)
    z_back = options.constrain(alpha * z + (1.0 - alpha) * (options.noise_scale * eps.to(z.device)))
    pred = predict(z_back, t_back, x_prev)
    return z_back + (t_next - t_back) * pred.v, pred


_STEPS: dict[str, Step] = {"euler": _euler, "heun": _heun, "midpoint": _midpoint, "dpm2m": _dpm2m, "sde": _sde}


@torch.no_grad()
def integrate(
    predict: PredictFn,
    z: Tensor,
    grid: Tensor,
    *,
    method: SolverName = "euler",
    churn: float = 0.0,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
    constrain: Callable[[Tensor], Tensor] = _identity,
    last_step: LastStep = "euler",
    x_init: Tensor | None = None,
    on_step: StepCallback | None = None,
) -> SampleOutput:
    """Integrate ``dz/dt = v̂(z, t)`` along ``grid`` (core time: 0 noise, 1 data).

    Each step calls ``predict(z, t, x_prev)`` with ``t`` a (B,) fp32 tensor; ``x_prev`` starts at
    ``x_init`` (zeros by default) and is replaced by every step's x̂ (the self-conditioning carry).

    Args:
        predict: the prediction function (a guidance wrapper around a DenoiseFn, typically).
        z: (B, N, C) initial state at ``grid[0]``; integrated in fp32.
        grid: (n + 1,) strictly increasing times within [0, 1] (see :mod:`cdlm.sampling.grids`), or (B, n + 1)
            one such grid per row (not with ``"sde"``). Euler also takes a repeated time: a step of length zero.
        method: ``"euler"``, ``"heun"`` or ``"midpoint"`` (2 evaluations per step), ``"dpm2m"`` (second-order
            multistep for x-prediction paths ``z_t = t·x + (1 − t)·s·ε``, 1 evaluation per step) or ``"sde"``
            (ELF's back-off sampler).
        churn: SDE back-off γ per unit time; 0 makes ``"sde"`` equal to ``"euler"`` (noise is still drawn).
        noise_scale: standard deviation ``s`` of the SDE re-noising.
        generator: source of the SDE noise; required for ``method="sde"``.
        constrain: applied to the state after every step and to every intermediate state (e.g. re-pin
            condition positions); identity by default.
        last_step: ``"euler"`` makes the final interval a plain Euler step (ELF spec §4.3); ``"same"`` keeps
            ``method`` throughout.
        x_init: (B, N, C) first self-conditioning input; zeros when None.
        on_step: called after every step with a :class:`StepInfo` holding copies (it cannot alter the run).

    Returns:
        The fp32 state at ``grid[-1]``, the last x̂ and the number of ``predict`` calls.

    Raises:
        DataError: an invalid grid, method, last_step or churn, or ``method="sde"`` without a generator.
    """
    check_grid(grid, repeats=method == "euler")  # a zero-length Euler step leaves z, as the reference's loops do
    _check_options(method, last_step, churn, generator, per_row=grid.dim() == 2)
    counted = _Counted(predict)
    options = _Options(churn=churn, noise_scale=noise_scale, generator=generator, constrain=constrain)
    z = z.float()
    x_prev = torch.zeros_like(z) if x_init is None else x_init.float()
    times: list[Time] = grid.tolist() if grid.dim() == 1 else list(grid.float().to(z.device).unbind(1))
    last = len(times) - 2
    for i, (t, t_next) in enumerate(pairwise(times)):
        step = _euler if i == last and last_step == "euler" else _STEPS[method]
        z, pred = step(counted, z, _Interval(t, t_next, times[i - 1] if i > 0 else None), x_prev, options)
        z, x_prev = constrain(z), pred.x
        if on_step is not None:
            seen = Prediction(x=pred.x.clone(), v=pred.v.clone())
            on_step(StepInfo(index=i, t=t, t_next=t_next, z=z.clone(), pred=seen, nfe=counted.calls))
    return SampleOutput(z=z, x=x_prev, nfe=counted.calls)


def _check_options(
    method: str, last_step: str, churn: float, generator: torch.Generator | None, *, per_row: bool
) -> None:
    if method not in _STEPS:
        raise DataError(f"integrate: method={method!r} is unknown; expected one of {sorted(_STEPS)}")
    if last_step not in ("euler", "same"):
        raise DataError(f"integrate: last_step={last_step!r} is unknown; expected 'euler' or 'same'")
    if churn < 0:
        raise DataError(f"integrate: churn must be ≥ 0, got {churn}")
    if method == "sde" and generator is None:
        raise DataError("integrate: method='sde' draws noise and needs generator=torch.Generator(); got None")
    if method == "sde" and per_row:
        raise DataError("integrate: method='sde' takes a grid shared by every row (n + 1,); got a per-row grid")
