"""Time grids for the samplers: fp32 CPU tensors in core time (0 = noise, 1 = data), built by the caller.

A grid is data, not a solver setting: the caller builds it (and may replay a recorded one) and passes it to
:func:`cdlm.sampling.solvers.integrate`, which validates it with :func:`check_grid`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdlm.errors import DataError


def uniform(n: int) -> Tensor:
    """Return the uniform grid ``linspace(0, 1, n + 1)``.

    Args:
        n: number of steps, at least 1.

    Returns:
        (n + 1,) fp32 grid from 0 to 1.

    Raises:
        DataError: ``n`` is not a positive integer.
    """
    _check_steps(n)
    return torch.linspace(0.0, 1.0, n + 1, dtype=torch.float32)


def logit_normal_times(n: int, generator: torch.Generator, mean: float, std: float) -> Tensor:
    """Draw ``n`` logit-normal times ``sigmoid(mean + std · N(0, 1))``, unsorted (ELF spec §3.2 step 1, §4.1).

    Args:
        n: number of times to draw (may be 0).
        generator: the generator every draw comes from.
        mean: location of the logit.
        std: scale of the logit.

    Returns:
        (n,) fp32 times in (0, 1), on the generator's device.
    """
    logits = torch.randn(n, generator=generator, dtype=torch.float32, device=generator.device)  # (n,)
    return torch.sigmoid(logits * std + mean)


def logit_normal(n: int, generator: torch.Generator, mean: float = -1.5, std: float = 0.8) -> Tensor:
    """Return the random grid ``[0, sort(sigmoid(mean + std · N(0, 1)) × (n − 1)), 1]`` (ELF spec §4.1).

    Args:
        n: number of steps, at least 1 (n = 1 gives ``[0, 1]`` and draws nothing).
        generator: the generator the n − 1 inner times are drawn from.
        mean: location of the logit of the inner times.
        std: scale of the logit of the inner times.

    Returns:
        (n + 1,) fp32 CPU grid from 0 to 1.

    Raises:
        DataError: ``n`` is not a positive integer.
    """
    _check_steps(n)
    inner = logit_normal_times(n - 1, generator, mean, std).cpu().sort().values  # (n - 1,)
    return torch.cat([torch.zeros(1), inner, torch.ones(1)])  # (n + 1,)


def shifted(n: int, shift: float) -> Tensor:
    """Return the uniform grid warped toward the noise end by ``shift`` (the resolution-shift of SD3-style flows).

    With noise level ``σ = 1 − t``, each uniform ``σ`` becomes ``shift·σ / (1 + (shift − 1)·σ)``: ``shift > 1``
    spends more steps near the noise end, ``shift < 1`` near the data end, ``shift = 1`` is :func:`uniform`.

    Args:
        n: number of steps, at least 1.
        shift: positive warp factor.

    Returns:
        (n + 1,) fp32 grid from 0 to 1 (endpoints exact).

    Raises:
        DataError: ``n`` is not a positive integer or ``shift`` is not positive.
    """
    _check_steps(n)
    if not shift > 0:
        raise DataError(f"time grid: expected a positive shift, got {shift!r}")
    sigma = 1.0 - torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)  # (n + 1,) noise levels 1 → 0
    warped = shift * sigma / (1.0 + (shift - 1.0) * sigma)
    return (1.0 - warped).float()


def logit_normal_quantiles(n: int, mean: float = -1.5, std: float = 0.8) -> Tensor:
    """Return the deterministic logit-normal grid: inner times at the quantiles ``j / n`` of ``sigmoid(N(mean, std²))``.

    The expectation-free counterpart of :func:`logit_normal`: the same density of steps, no draws, so every batch
    shares one grid.

    Args:
        n: number of steps, at least 1.
        mean: location of the logit.
        std: scale of the logit.

    Returns:
        (n + 1,) fp32 grid ``[0, sigmoid(mean + std·Φ⁻¹(j / n)) for j = 1..n − 1, 1]``.

    Raises:
        DataError: ``n`` is not a positive integer.
    """
    _check_steps(n)
    quantiles = torch.arange(1, n, dtype=torch.float64) / n  # (n − 1,)
    inner = torch.sigmoid(mean + std * torch.special.ndtri(quantiles))
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.ones(1, dtype=torch.float64)]).float()


def check_grid(grid: Tensor, *, repeats: bool = False) -> None:
    """Check that ``grid`` holds at least two times per row, strictly increasing, within [0, 1].

    Args:
        grid: (n + 1,) float times shared by every row, or (B, n + 1) one grid per row.
        repeats: also accept a time equal to the one before it, a step of length zero (drawn sub-step times
            can tie in fp32; an Euler step of length zero leaves the state where it is).

    Raises:
        DataError: the grid has the wrong shape or dtype, or the message names the offending entries.
    """
    if grid.dim() not in (1, 2) or grid.shape[-1] < 2 or grid.numel() == 0 or not grid.is_floating_point():
        raise DataError(
            "time grid: expected a float tensor (n + 1,) or (B, n + 1) of at least 2 times per row, got shape "
            f"{tuple(grid.shape)} {grid.dtype}"
        )
    values = grid.detach().double().cpu()
    outside = torch.nonzero((values < 0) | (values > 1) | values.isnan()).tolist()
    if outside:
        found = ", ".join(f"grid{_at(i)} = {values[tuple(i)].item():.7g}" for i in outside[:8])
        raise DataError(f"time grid: expected every time within [0, 1]; found {found}")
    later = values[..., 1:]
    stalls = torch.nonzero(later < values[..., :-1] if repeats else later <= values[..., :-1]).tolist()
    if stalls:
        found = ", ".join(
            f"grid{_at(i)} = {values[tuple(i)].item():.7g} ≥ grid{_at(i, 1)} = "
            f"{values[tuple(i[:-1]) + (i[-1] + 1,)].item():.7g}"
            for i in stalls[:8]
        )
        allowed = " (or equal ones)" if repeats else ""
        raise DataError(f"time grid: expected strictly increasing times{allowed}; found {found}")


def _at(index: list[int], shift: int = 0) -> str:
    """Format a grid index ``[j]`` or ``[b, j]``, with the last coordinate shifted by ``shift``."""
    return str([*index[:-1], index[-1] + shift])


def _check_steps(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"time grid: expected a number of steps n ≥ 1, got {n!r}")
