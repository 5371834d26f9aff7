"""Guidance wrappers: each turns a DenoiseFn ``(z, t, x_prev, cond) → Prediction`` into a PredictFn.

A guided prediction is ``u + scale·(c − u)`` for both x̂ and v̂, computed in fp32 from ONE batched forward
of 2B rows (rows [0, B) the "c" branch, rows [B, 2B) the "u" branch). ``scale == 1`` needs only the c
branch, so it short-circuits to a single B-row forward. A scale may also be a (B,) tensor, one per row
(e.g. Cola turns guidance off for rows with an empty prompt, spec §5); that always runs both branches.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from cdlm.sampling.types import DenoiseFn, PredictFn, Prediction


class RepeatableConditioning(Protocol):
    """A conditioning that can describe the same B rows twice (2B rows), as self-conditioning guidance needs."""

    def repeated(self) -> RepeatableConditioning:
        """Return the conditioning of 2B rows whose rows [B, 2B) equal rows [0, B)."""
        ...


def conditional(denoise: DenoiseFn, cond: Any) -> PredictFn:
    """Return the unguided prediction function ``(z, t, x_prev) → denoise(z, t, x_prev, cond)``.

    Args:
        denoise: the method's DenoiseFn.
        cond: conditioning of the B rows (plugin-defined).
    """

    def predict(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        return denoise(z, t, x_prev, cond)

    return predict


def classifier_free(denoise: DenoiseFn, cond: Any, scale: float | Tensor) -> PredictFn:
    """Return classifier-free guidance ``v̂ = v_u + s·(v_c − v_u)`` and ``x̂ = x_u + s·(x_c − x_u)``.

    The conditional and unconditional rows run in one forward of 2B rows conditioned on
    ``cond.with_null_rows()``; the NFE count is unchanged, the batch doubles.

    Args:
        denoise: the method's DenoiseFn.
        cond: conditioning of the B rows; must provide ``with_null_rows()``.
        scale: guidance scale s, a number or a (B,) tensor of per-row scales; the number 1 means no guidance
            (single B-row forward).
    """
    if not isinstance(scale, Tensor) and scale == 1.0:
        return conditional(denoise, cond)
    both = cond.with_null_rows()

    def guided(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        pred = denoise(torch.cat([z, z]), torch.cat([t, t]), torch.cat([x_prev, x_prev]), both)  # (2B, N, C)
        return combine(pred, scale)

    return guided


def self_conditioning(denoise: DenoiseFn, cond: RepeatableConditioning | None, scale: float) -> PredictFn:
    """Return self-conditioning guidance: c = the prediction given x_prev, u = given zeros (ELF spec §4.2).

    The legacy ELF guidance for networks without SC-CFG tokens: ``u + w·(c − u)`` for x̂ and v̂, with both
    branches in one forward of 2B rows. ``w = 1`` keeps only c, ``w = 0`` only u (single forward each).

    Args:
        denoise: the method's DenoiseFn (it restores condition positions of x_prev itself, if any).
        cond: conditioning of the B rows, or None for an unconditional model.
        scale: guidance scale w.
    """
    if scale == 1.0:
        return conditional(denoise, cond)
    if scale == 0.0:
        return lambda z, t, x_prev: denoise(z, t, torch.zeros_like(x_prev), cond)
    both = None if cond is None else cond.repeated()

    def guided(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        self_cond = torch.cat([x_prev, torch.zeros_like(x_prev)])  # (2B, N, C)
        return combine(denoise(torch.cat([z, z]), torch.cat([t, t]), self_cond, both), scale)

    return guided


def combine(pred: Prediction, scale: float | Tensor) -> Prediction:
    """Combine a 2B-row prediction (rows [0, B) = c, [B, 2B) = u) into ``u + scale·(c − u)``, in fp32.

    Args:
        pred: x̂ and v̂ of 2B rows, (2B, N, C) each.
        scale: a number, or a (B,) tensor with one scale per row.

    Returns:
        The guided (B, N, C) fp32 prediction.
    """
    (x_c, x_u), (v_c, v_u) = pred.x.float().chunk(2), pred.v.float().chunk(2)
    if isinstance(scale, Tensor):
        scale = scale.to(device=v_c.device, dtype=torch.float32).reshape(-1, *([1] * (v_c.dim() - 1)))  # (B, 1, 1)
    return Prediction(x=x_u + scale * (x_c - x_u), v=v_u + scale * (v_c - v_u))
