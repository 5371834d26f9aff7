"""The core training objective: flow matching composed from a method's four components.

One step of :class:`FlowMatchingObjective` (core time: t = 0 noise, t = 1 data):

1. draw t (B,) from ``schedule.sample_t``, then ε (B, N, C) ~ N(0, I), both from the step's generator;
2. embed the clean latents x = embedder(batch) (B, N, C);
3. noise them, ``z = schedule.interpolate(x, ε, t)``, and predict, ``schedule.predict(denoiser(z, t, cond), z, t)``;
4. per position, the squared error of v̂ against ``schedule.velocity(x, ε, z, t)``, averaged over C (``mse``);
   a discretizer that trains adds the cross-entropy of its logits of the clean latents (``ce``);
5. sum every term over the loss positions (``batch.mask & ~batch.cond_mask``) and divide by their count: one
   denominator for all terms (:func:`combine`).

The draws (:meth:`FlowMatchingObjective.draw`) are split from the maths (:meth:`FlowMatchingObjective.loss`), so a
recorded step replays exactly. A method changes only what differs by overriding a hook: ``draw`` (more draws, in
its order), ``embed``, ``loss_mask``, ``condition`` or ``terms``. ELF (:mod:`cdlm_elf.objective`) adds label
dropout to the draws and the embedding, and its decoder rows and SC-CFG target to the terms. Cola
(:mod:`cdlm_cola.objective`) overrides ``draw`` and ``loss``: per-sample block sizes and noise, and the 2L layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from cdlm.errors import DataError
from cdlm.interfaces import (
    Conditioning,
    Denoiser,
    Discretizer,
    Embedder,
    FlowSchedule,
    LossOutput,
    Objective,
    TokenBatch,
)

if TYPE_CHECKING:
    from cdlm.interfaces import Method


@dataclass(frozen=True)
class FlowDraws:
    """The random draws of one flow-matching step, in draw order.

    Attributes:
        t: (B,) core training times from ``schedule.sample_t``.
        eps: (B, N, C) N(0, 1) noise (the schedule scales it on the path).
    """

    t: Tensor
    eps: Tensor


@dataclass(frozen=True)
class LossTerm:
    """One per-position loss and the positions it is summed over.

    Attributes:
        values: (B, N) fp32 loss per position.
        mask: (B, N) float 0/1, the positions counted: the loss mask, or a part of it (e.g. some rows only).
    """

    values: Tensor
    mask: Tensor

    def mean(self) -> Tensor:
        """Return the term's mean () over its positions, ``Σ values·mask / max(Σ mask, 1)`` (0 with none)."""
        return (self.values * self.mask).sum() / self.mask.sum().clamp_min(1)


def combine(terms: Mapping[str, LossTerm], loss_mask: Tensor) -> LossOutput:
    """Sum every term over its positions and divide by one denominator, the number of loss positions.

    Args:
        terms: the loss terms by metric name.
        loss_mask: (B, N) float 0/1, every position that counts toward the loss.

    Returns:
        ``Σ_terms Σ values·mask / Σ loss_mask``, and each term's mean over its own positions as a metric.
    """
    sums = {name: (term.values * term.mask).sum() for name, term in terms.items()}
    loss = sum(sums.values()) / loss_mask.sum().clamp_min(1)
    metrics = {name: float(term.mean().detach()) for name, term in terms.items()}
    return LossOutput(loss=loss, metrics=metrics)


def token_cross_entropy(logits: Tensor, ids: Tensor) -> Tensor:
    """Return the cross-entropy (B, L) fp32 of logits (B, L, V) against token ids (B, L), per token."""
    return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)


class FlowMatchingObjective(Objective):
    """Flow matching over a method's four components (see the module docstring for the step).

    Args:
        embedder: maps a batch to its clean latents x (B, N, C).
        denoiser: the network trained to predict at (z, t).
        schedule: training times, the path and the parametrisation of the denoiser's output.
        latent_shape: ``(N, C)`` of one row's latents: the noise drawn per row; None for a subclass whose
            :meth:`draw` shapes its own noise (Cola: per sample, rows padded to the block size each draws).
        discretizer: a discretizer with trainable parameters (a learned head), trained by the cross-entropy of
            its logits of the clean latents; None when it has nothing to train (a nearest-embedding lookup).
    """

    def __init__(
        self,
        embedder: Embedder,
        denoiser: Denoiser,
        schedule: FlowSchedule,
        latent_shape: tuple[int, int] | None = None,
        *,
        discretizer: Discretizer | None = None,
    ) -> None:
        self.embedder, self.denoiser, self.schedule = embedder, denoiser, schedule
        self.latent_shape, self.discretizer = latent_shape, discretizer

    @classmethod
    def for_method(cls, method: Method) -> FlowMatchingObjective:
        """Compose the objective of a method's components.

        Its discretizer is trained (``ce``) when one of its parameters belongs to a module of ``method.trainable``.
        """
        assert method.embedder and method.denoiser and method.schedule and method.discretizer and method.latent_shape
        trained = {id(p) for module in method.trainable.values() for p in module.parameters()}
        learned = any(id(p) in trained for p in method.discretizer.parameters())
        return cls(
            method.embedder,
            method.denoiser,
            method.schedule,
            method.latent_shape,
            discretizer=method.discretizer if learned else None,
        )

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Draw this step's random numbers from ``generator`` and compute the loss of ``batch``."""
        return self.loss(batch, self.draw(batch, generator))

    def draw(self, batch: TokenBatch, generator: torch.Generator) -> FlowDraws:
        """Draw the times, then the noise, from ``generator`` (on its device, then moved to the batch's).

        Args:
            batch: the micro-batch; ``ids`` (B, L) gives B and the device.
            generator: the only source of randomness.
        """
        assert self.latent_shape is not None, f"{type(self).__name__} has no latent_shape: it draws its own noise"
        B, device = batch.ids.shape[0], batch.ids.device
        t = self.schedule.sample_t(B, generator).to(device)  # (B,)
        eps = torch.randn((B, *self.latent_shape), generator=generator, device=generator.device)  # (B, N, C)
        return FlowDraws(t=t, eps=eps.to(device))

    def loss(self, batch: TokenBatch, draws: FlowDraws) -> LossOutput:
        """Compute the loss of ``batch`` for given draws: embed, then :meth:`terms` over :meth:`loss_mask`.

        Args:
            batch: ``ids`` (B, L) int64, ``mask`` (B, L) bool validity, ``cond_mask`` (B, L) bool condition.
            draws: the step's random draws (:meth:`draw`).

        Raises:
            DataError: the embedder's latents do not have the shape the noise was drawn for.
        """
        x = self.embed(batch, draws)  # (B, N, C)
        if x.shape[1:] != draws.eps.shape[1:]:
            raise DataError(
                f"{type(self).__name__}: rows of {batch.ids.shape[1]} tokens embed to latents (N, C) = "
                f"{tuple(x.shape[1:])}, but the method's latent_shape is {tuple(draws.eps.shape[1:])}; set "
                "data.seq_len to the length the model generates (its latent_shape), or build the method for this length"
            )
        mask = self.loss_mask(batch)  # (B, N)
        return combine(self.terms(batch, x, draws, mask), mask)

    def embed(self, batch: TokenBatch, draws: FlowDraws) -> Tensor:
        """Return the clean latents x (B, N, C) fp32 of ``batch``."""
        return self.embedder(batch).float()

    def loss_mask(self, batch: TokenBatch) -> Tensor:
        """Return (B, N) float 0/1: the positions trained, real tokens outside the condition (one latent per token)."""
        return (batch.mask & ~batch.cond_mask).float()

    def condition(self, batch: TokenBatch, x: Tensor, draws: FlowDraws) -> Conditioning:
        """Return the conditioning the denoiser and the discretizer see (plugin-defined); None: unconditional."""
        return None

    def terms(self, batch: TokenBatch, x: Tensor, draws: FlowDraws, mask: Tensor) -> dict[str, LossTerm]:
        """Return the per-position loss terms: ``mse`` on v̂, and ``ce`` of the discretizer when it trains.

        Args:
            batch: the micro-batch (``ids`` are the discretizer's targets).
            x: (B, N, C) clean latents.
            draws: the step's times and noise.
            mask: (B, N) the loss mask.
        """
        t, eps = draws.t, draws.eps
        cond = self.condition(batch, x, draws)
        z = self.schedule.interpolate(x, eps, t)  # (B, N, C)
        pred = self.schedule.predict(self.denoiser(z, t, cond), z, t)
        target = self.schedule.velocity(x, eps, z, t)  # (B, N, C)
        terms = {"mse": LossTerm((pred.v - target).pow(2).mean(dim=-1), mask)}  # (B, N)
        if self.discretizer is not None:
            terms["ce"] = LossTerm(token_cross_entropy(self.discretizer(x, cond), batch.ids), mask)
        return terms
