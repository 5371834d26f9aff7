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


def check_grid(grid: Tensor) -> None:
    """Check that ``grid`` is a 1-D grid of at least two times, strictly increasing, within [0, 1].

    Args:
        grid: (n + 1,) float times.

    Raises:
        DataError: the grid has the wrong shape or dtype, or the message names the offending entries.
    """
    if grid.dim() != 1 or grid.numel() < 2 or not grid.is_floating_point():
        raise DataError(
            f"time grid: expected a 1-D float tensor of at least 2 times, got shape {tuple(grid.shape)} {grid.dtype}"
        )
    values = grid.detach().double().cpu()
    outside = torch.nonzero((values < 0) | (values > 1) | values.isnan()).flatten().tolist()
    if outside:
        found = ", ".join(f"grid[{i}] = {values[i].item():.7g}" for i in outside[:8])
        raise DataError(f"time grid: expected every time within [0, 1]; found {found}")
    stalls = torch.nonzero(values[1:] <= values[:-1]).flatten().tolist()
    if stalls:
        found = ", ".join(
            f"grid[{i}] = {values[i].item():.7g} ≥ grid[{i + 1}] = {values[i + 1].item():.7g}" for i in stalls[:8]
        )
        raise DataError(f"time grid: expected strictly increasing times; found {found}")


def _check_steps(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"time grid: expected a number of steps n ≥ 1, got {n!r}")
