"""Value types shared by the samplers, the guidance wrappers and the plugins' generation pipelines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class Prediction:
    """One network evaluation turned into the two quantities a sampler needs (fp32, core time).

    Attributes:
        x: (B, N, C) clean-sample estimate.
        v: (B, N, C) velocity ``dz/dt`` (t = 0 noise, t = 1 data).
    """

    x: Tensor
    v: Tensor


PredictFn = Callable[[Tensor, Tensor, Tensor], Prediction]
"""``(z (B, N, C), t (B,), x_prev (B, N, C)) → Prediction``: what a solver integrates."""

DenoiseFn = Callable[[Tensor, Tensor, Tensor, Any], Prediction]
"""``(z, t, x_prev, cond) → Prediction``: a Denoiser plus its schedule's ``predict``, autocast inside."""


@dataclass(frozen=True)
class StepInfo:
    """What a per-step callback observes. Callbacks never change the trajectory.

    Attributes:
        index: step index, 0-based.
        t: core time at the start of the step; (B,) per-row times when the grid is per row.
        t_next: core time at the end of the step; (B,) per-row times when the grid is per row.
        z: (B, N, C) fp32 state after the step.
        pred: the last prediction of the step.
        nfe: network evaluations so far.
    """

    index: int
    t: float | Tensor
    t_next: float | Tensor
    z: Tensor
    pred: Prediction
    nfe: int


@dataclass(frozen=True)
class SampleOutput:
    """Result of one integration.

    Attributes:
        z: (B, N, C) fp32 state at the end of the grid.
        x: (B, N, C) last clean estimate (the self-conditioning carry).
        nfe: calls of the prediction function, counted, never derived from the grid length.
    """

    z: Tensor
    x: Tensor
    nfe: int


StepCallback = Callable[[StepInfo], None]
