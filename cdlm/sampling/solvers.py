"""Stateless rectified-flow solvers: a prediction function and a grid go in, the integrated sample comes out.

Every step is a pure function ``(predict, z, t, t_next, x_prev, options) → (z, Prediction)`` listed in
``_STEPS``; a new solver is one function plus one entry. The sampler state stays fp32 whatever the
network computes in, and the number of network evaluations is counted by a wrapper around ``predict``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch
from torch import Tensor

from cdlm.errors import DataError
from cdlm.sampling.grids import check_grid
from cdlm.sampling.types import PredictFn, Prediction, SampleOutput, StepCallback, StepInfo

Method = Literal["euler", "heun", "sde"]
LastStep = Literal["euler", "same"]


def _identity(z: Tensor) -> Tensor:
    return z


class _Counted:
    """Calls ``predict`` with per-row fp32 times, returns an fp32 Prediction and counts the calls."""

    def __init__(self, predict: PredictFn) -> None:
        self.predict = predict
        self.calls = 0

    def __call__(self, z: Tensor, t: float, x_prev: Tensor) -> Prediction:
        self.calls += 1
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


Step = Callable[[_Counted, Tensor, float, float, Tensor, _Options], tuple[Tensor, Prediction]]


def _euler(
    predict: _Counted, z: Tensor, t: float, t_next: float, x_prev: Tensor, options: _Options
) -> tuple[Tensor, Prediction]:
    """First order: ``z + (t_next − t)·v̂(z, t)``."""
    pred = predict(z, t, x_prev)
    return z + (t_next - t) * pred.v, pred


def _heun(
    predict: _Counted, z: Tensor, t: float, t_next: float, x_prev: Tensor, options: _Options
) -> tuple[Tensor, Prediction]:
    """Second order: an Euler predictor, then the average of the slopes at both ends.

    The slope at ``t_next`` sees the predictor's x̂ as its self-conditioning input.
    """
    first = predict(z, t, x_prev)
    guess = options.constrain(z + (t_next - t) * first.v)
    second = predict(guess, t_next, first.x)
    return z + (t_next - t) * 0.5 * (first.v + second.v), second


def _sde(
    predict: _Counted, z: Tensor, t: float, t_next: float, x_prev: Tensor, options: _Options
) -> tuple[Tensor, Prediction]:
    """Back off to ``t_b = α·t`` with fresh noise, then take an Euler step to ``t_next`` (ELF spec §4.3).

    ``α = clip(1 − γ·h, 0, 1)`` with γ = churn and h = t_next − t; ``z_b = α·z + (1 − α)·s·ε``, re-constrained.
    The noise is drawn on the generator's device (a CPU generator for reproducible draws), then moved.
    """
    assert options.generator is not None  # checked by integrate
    alpha = min(max(1.0 - options.churn * (t_next - t), 0.0), 1.0)
    t_back = alpha * t
    eps = torch.randn(z.shape, generator=options.generator, dtype=torch.float32, device=options.generator.device)
    z_back = options.constrain(alpha * z + (1.0 - alpha) * (options.noise_scale * eps.to(z.device)))
    pred = predict(z_back, t_back, x_prev)
    return z_back + (t_next - t_back) * pred.v, pred


_STEPS: dict[str, Step] = {"euler": _euler, "heun": _heun, "sde": _sde}


@torch.no_grad()
def integrate(
    predict: PredictFn,
    z: Tensor,
    grid: Tensor,
    *,
    method: Method = "euler",
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
        grid: (n + 1,) strictly increasing times within [0, 1] (see :mod:`cdlm.sampling.grids`).
        method: ``"euler"``, ``"heun"`` (2 evaluations per step) or ``"sde"`` (ELF's back-off sampler).
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
    check_grid(grid)
    _check_options(method, last_step, churn, generator)
    counted = _Counted(predict)
    options = _Options(churn=churn, noise_scale=noise_scale, generator=generator, constrain=constrain)
    z = z.float()
    x_prev = torch.zeros_like(z) if x_init is None else x_init.float()
    times = grid.tolist()
    last = len(times) - 2
    for i, (t, t_next) in enumerate(pairwise(times)):
        step = _euler if i == last and last_step == "euler" else _STEPS[method]
        z, pred = step(counted, z, t, t_next, x_prev, options)
        z, x_prev = constrain(z), pred.x
        if on_step is not None:
            seen = Prediction(x=pred.x.clone(), v=pred.v.clone())
            on_step(StepInfo(index=i, t=t, t_next=t_next, z=z.clone(), pred=seen, nfe=counted.calls))
    return SampleOutput(z=z, x=x_prev, nfe=counted.calls)


def _check_options(method: str, last_step: str, churn: float, generator: torch.Generator | None) -> None:
    if method not in _STEPS:
        raise DataError(f"integrate: method={method!r} is unknown; expected one of {sorted(_STEPS)}")
    if last_step not in ("euler", "same"):
        raise DataError(f"integrate: last_step={last_step!r} is unknown; expected 'euler' or 'same'")
    if churn < 0:
        raise DataError(f"integrate: churn must be ≥ 0, got {churn}")
    if method == "sde" and generator is None:
        raise DataError("integrate: method='sde' draws noise and needs generator=torch.Generator(); got None")
