"""Progressive distillation over the shared samplers (Salimans & Ho 2022 in flow-matching form; ELF spec §8).

A student with the teacher's architecture learns to cover a span Δ = 1/``steps`` of core time in one evaluation.
Per row: ``t_s = u·max(1 − Δ, 1e-6)`` and ``t_t = t_s + Δ`` with u a training time of the method's schedule; the
frozen teacher integrates from ``z_{t_s}`` to ``t_t`` in ``teacher_steps`` Euler sub-steps (the shared
:func:`~cdlm.sampling.solvers.integrate` on a per-row grid whose inner times are sorted training times, rescaled
into the span), and the implied x-target is ``x* = z_s + (1 − t_s)/Δ·(z_t − z_s)``. The student regresses its
x̂ at ``(z_{t_s}, t_s)`` on x* (x-space MSE, per-example means over the loss mask).

Any method whose Denoiser and FlowSchedule feed the shared samplers is distilled by
:class:`ProgressiveDistillation`; a method with extra training branches (ELF's decoder rows and
self-conditioning) or its own layout (Cola's blocks) composes :func:`draw_spans` (or :func:`student_times` and
:func:`teacher_grid`), :func:`teacher_target` and :func:`per_example_mean` in its own objective. A plugin opts
in by giving its ``model:`` section a ``distill: DistillConfig | None`` field (a subclass for extra settings).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from cdlm.config import Section
from cdlm.errors import RecipeError
from cdlm.interfaces import Denoiser, Embedder, FlowSchedule, LossOutput, Objective, TokenBatch
from cdlm.sampling.solvers import integrate
from cdlm.sampling.types import PredictFn, Prediction

SPAN_FLOOR = 1e-6  # parity: utils/distill_utils.py, the clamp of Δ and of 1 − Δ (spec §8)
FALLBACK_SPAN = 1e-3  # rows spanning less than this take the teacher's last x̂ (spec §8)


class DistillConfig(Section):
    """One progressive-distillation round: the frozen teacher and the step counts (ELF spec §8)."""

    teacher: str | None = Field(
        None, description="the frozen teacher: a run, checkpoint, save_pretrained or released directory, or hub id"
    )
    teacher_use_ema: bool = Field(True, description="read the teacher's EMA weights when it has them")
    steps: PositiveInt = Field(16, description="student steps; each student evaluation spans Δ = 1/steps")
    teacher_steps: PositiveInt = Field(4, description="teacher Euler sub-steps per student span")


class Teacher:
    """The frozen teacher's Denoiser, read on first use and moved to the student's device.

    Args:
        settings: the ``model.distill`` section (``teacher``, ``teacher_use_ema``).
        denoiser: an already built teacher (tests, in-memory distillation); None reads ``settings.teacher``.
    """

    def __init__(self, settings: DistillConfig, denoiser: Denoiser | None = None) -> None:
        self.settings, self._denoiser = settings, denoiser

    def denoiser(self, device: torch.device) -> Denoiser:
        """Return the teacher in eval mode without gradients on ``device``, reading it the first time.

        Raises:
            RecipeError: ``model.distill.teacher`` is not set.
            CheckpointError: the teacher cannot be read or its weights do not fit its recorded config.
        """
        if self._denoiser is None:
            if self.settings.teacher is None:
                raise RecipeError(
                    "model.distill.teacher: not set; give the teacher to distil from (a run directory, checkpoint or "
                    "hub id), e.g. --set model.distill.teacher=runs/elf-tiny or `cdlm distill --teacher DIR`"
                )
            from cdlm.loading import load_weights, read_source  # the loader imports the registry of methods
            from cdlm.registry import get_method

            source = read_source(self.settings.teacher)
            method = get_method(source.config.method).build(source.config)
            load_weights(method, source, use_ema=self.settings.teacher_use_ema and source.ema is not None)
            self._denoiser = method.denoiser
        return self._denoiser.to(device).eval().requires_grad_(False)


def student_times(u: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Return the student span ``t_s = u·max(1 − Δ, 1e-6)``, ``t_t = min(t_s + Δ, 1)`` (Δ = 1/steps) for times u (B,).

    Only a one-step round reaches past the data end (the reference's ``t_t`` is then up to 1 + 1e-6): the span stops
    at 1, where the shared solver's grid ends, which moves the implied target by at most 1e-6 of a step.
    """
    delta = 1.0 / steps
    t_s = u * max(1.0 - delta, SPAN_FLOOR)  # (B,)
    return t_s, (t_s + delta).clamp(max=1.0)


def teacher_grid(t_s: Tensor, t_t: Tensor, inner: Tensor) -> Tensor:
    """Return each row's sub-step grid ``[t_s, t_s + (t_t − t_s)·sort(inner), t_t]`` (B, n + 1).

    Args:
        t_s: (B,) span starts.
        t_t: (B,) span ends.
        inner: (B, n − 1) unsorted fractions in (0, 1), e.g. training times of the schedule.
    """
    fractions = inner.sort(dim=-1).values  # (B, n - 1)
    middle = t_s[:, None] + (t_t - t_s)[:, None] * fractions  # (B, n - 1)
    return torch.cat([t_s[:, None], middle, t_t[:, None]], dim=-1)  # (B, n + 1)


@torch.no_grad()
def teacher_target(
    predict: PredictFn,
    z: Tensor,
    grid: Tensor,
    x_init: Tensor,
    *,
    constrain: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Return the teacher's implied x-target (B, N, C) over each row's grid (ELF spec §8 "Teacher target").

    With one sub-step the target is the teacher's x̂ at ``(z, grid[:, 0])``. Otherwise the teacher takes Euler steps
    along ``grid`` (the self-conditioning carry starts at ``x_init``, then chains the teacher's x̂) and the target is
    ``z_s + (1 − t_s)/max(t_t − t_s, 1e-6)·(z_t − z_s)``; rows spanning < 1e-3 take the last x̂.

    Args:
        predict: the teacher's prediction function ``(z, t (B,), x_prev) → Prediction``.
        z: (B, N, C) state at the span starts ``grid[:, 0]``.
        grid: (B, n + 1) per-row sub-step times, strictly increasing (:func:`teacher_grid`).
        x_init: (B, N, C) self-conditioning input of the first sub-step.
        constrain: applied to the state after every sub-step (e.g. re-pin condition positions).
    """
    t_s, t_t = grid[:, 0], grid[:, -1]  # (B,)
    if grid.shape[1] == 2:
        return predict(z, t_s, x_init).x.float()
    out = integrate(predict, z, grid, last_step="same", x_init=x_init, constrain=constrain or (lambda u: u))
    shape = (-1,) + (1,) * (z.dim() - 1)
    span = (t_t - t_s).float().view(shape)  # (B, 1, 1)
    ratio = (1.0 - t_s.float().view(shape)) / span.clamp_min(SPAN_FLOOR)
    target = z.float() + ratio * (out.z - z.float())  # (B, N, C)
    return torch.where(span < FALLBACK_SPAN, out.x, target)


@dataclass(frozen=True)
class SpanDraws:
    """One distillation step's random draws, made into what the student and the teacher read.

    Attributes:
        t_s: (B,) the student's span starts (core time).
        grid: (B, teacher_steps + 1) each row's teacher sub-step grid from ``t_s`` to its span end.
        z: (B, N, C) the noisy state at ``t_s``.
    """

    t_s: Tensor
    grid: Tensor
    z: Tensor


def draw_spans(schedule: FlowSchedule, x: Tensor, settings: DistillConfig, generator: torch.Generator) -> SpanDraws:
    """Draw, in order, the student times u, the noise ε (B, N, C) and the teacher's inner sub-step times.

    u and the inner times are training times of ``schedule`` (``sample_t``; B·(teacher_steps − 1) inner ones), drawn
    on the generator's device and moved to x's. Returns the spans of :func:`student_times`, the grids of
    :func:`teacher_grid` and ``z = interpolate(x, ε, t_s)``.
    """
    B, n = x.shape[0], settings.teacher_steps
    u = schedule.sample_t(B, generator).to(x.device)  # (B,)
    eps = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)  # (B, N, C)
    t_s, t_t = student_times(u, settings.steps)
    inner = schedule.sample_t(B * (n - 1), generator).to(x.device).view(B, n - 1)  # (B, n - 1)
    return SpanDraws(t_s=t_s, grid=teacher_grid(t_s, t_t, inner), z=schedule.interpolate(x, eps, t_s))


def per_example_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Return per-row means (B,) of ``values`` (B, L) over ``mask`` (B, L) (float), each denominator ≥ 1."""
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)


def schedule_predict(denoiser: Denoiser, schedule: FlowSchedule, cond: object = None) -> PredictFn:
    """Return the PredictFn of a plain Denoiser (no self-conditioning input) read through its schedule."""

    def predict(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        return schedule.predict(denoiser(z, t, cond), z, t)

    return predict


class ProgressiveDistillation(Objective):
    """Progressive distillation of any four-component method (unconditional, no self-conditioning).

    Draws as :func:`draw_spans` does.

    Args:
        embedder: maps a batch to the clean latents x (B, N, C).
        denoiser: the student.
        schedule: the path (``sample_t``, ``interpolate``, ``predict``), shared by student and teacher.
        teacher: the frozen teacher (its Denoiser is read through ``schedule``).
        settings: the round's ``model.distill`` section.
    """

    def __init__(
        self, embedder: Embedder, denoiser: Denoiser, schedule: FlowSchedule, teacher: Teacher, settings: DistillConfig
    ) -> None:
        self.embedder, self.denoiser, self.schedule = embedder, denoiser, schedule
        self.teacher, self.settings = teacher, settings

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Draw this step's times and noise from ``generator`` and return the x-space distillation loss."""
        x = self.embedder(batch).float()  # (B, N, C)
        draws = draw_spans(self.schedule, x, self.settings, generator)
        z, t_s = draws.z, draws.t_s
        predict = schedule_predict(self.teacher.denoiser(x.device), self.schedule)
        target = teacher_target(predict, z, draws.grid, torch.zeros_like(z))
        x_hat = self.schedule.predict(self.denoiser(z, t_s, None), z, t_s).x  # (B, N, C)
        per_token = (x_hat - target).pow(2).mean(dim=-1)  # (B, N)
        loss = per_example_mean(per_token, batch.mask.float()).mean()
        return LossOutput(loss=loss, metrics={"pd_loss": float(loss.detach())})
