"""The canonical rectified-flow path of the core.

Core time convention (every plugin converts to it at its own boundary):
``t = 0`` is noise, ``t = 1`` is data, and the velocity is ``v = dz/dt``. Along the path

    z_t = t · x + (1 − t) · s · eps,        eps ~ N(0, I),  s = noise scale,

the exact velocity is ``v = x − s · eps = (x − z_t) / (1 − t)``. Near ``t = 1`` the division is
clamped: ``v = (x − z) / max(1 − t, t_eps)`` (ELF spec §3.1, ``t_eps = 0.05``).

:class:`XPredictionSchedule` is this path as a ready :class:`~cdlm.interfaces.FlowSchedule` for an x-predicting
Denoiser; a plugin uses it as it is or subclasses it (ELF changes the training times).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cdlm.interfaces import FlowSchedule
from cdlm.sampling.types import Prediction


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-row times (B,) against a (B, ...) tensor."""
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


@dataclass(frozen=True)
class RectifiedFlow:
    """Linear noise → data path with a noise scale and a clamped x ↔ v conversion.

    Args:
        noise_scale: ``s``, the standard deviation of the noise end of the path.
        t_eps: lower clamp of ``1 − t`` when converting between x and v; 0 means no clamp.
    """

    noise_scale: float = 1.0
    t_eps: float = 0.0

    def interpolate(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Return ``z_t = t·x + (1 − t)·s·eps`` for data x (B, ...), noise eps (B, ...), times t (B,)."""
        t = _expand(t, x)
        return t * x + (1 - t) * (self.noise_scale * eps)

    def denominator(self, t: Tensor, like: Tensor) -> Tensor:
        """Return ``max(1 − t, t_eps)`` broadcast against ``like``."""
        return _expand((1 - t).clamp_min(self.t_eps), like)

    def velocity_from_x(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Return ``v = (x − z) / max(1 − t, t_eps)`` for clean estimate x and state z (B, ...) at t (B,)."""
        return (x - z) / self.denominator(t, z)

    def x_from_velocity(self, v: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Return the clean estimate ``x = z + (1 − t)·v`` reached by following v from z to t = 1."""
        return z + _expand(1 - t, z) * v


class XPredictionSchedule(FlowSchedule):
    """The canonical path read through an x-predicting Denoiser, with uniform training times.

    ``predict`` reads the raw output as x̂ and converts it with the clamped ``v̂ = (x̂ − z)/max(1 − t, t_eps)``;
    ``velocity`` converts the true x the same way, so a perfect x̂ has zero loss at every t. A subclass draws
    other training times by overriding :meth:`sample_t` (ELF: logit-normal).

    Args:
        noise_scale: ``s``, the standard deviation of the noise end of the path.
        t_eps: lower clamp of ``1 − t`` in the x ↔ v conversion (ELF spec §3.1).
    """

    def __init__(self, noise_scale: float = 1.0, t_eps: float = 0.05) -> None:
        self.flow = RectifiedFlow(noise_scale=noise_scale, t_eps=t_eps)

    @property
    def noise_scale(self) -> float:
        """``s``, the standard deviation of the noise end of the path."""
        return self.flow.noise_scale

    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` training times ``U[0, 1)`` (n,) fp32 on the generator's device."""
        return torch.rand(n, generator=generator, dtype=torch.float32, device=generator.device)

    def interpolate(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Return ``z_t = t·x + (1 − t)·s·eps`` for x, eps (B, N, C) and times t (B,)."""
        return self.flow.interpolate(x, eps, t)

    def predict(self, out: Tensor, z: Tensor, t: Tensor) -> Prediction:
        """Read the raw output (B, N, C) as x̂; ``v̂ = (x̂ − z)/max(1 − t, t_eps)``, in fp32."""
        x = out.float()
        return Prediction(x=x, v=self.flow.velocity_from_x(x, z.float(), t.float()))

    def velocity(self, x: Tensor, eps: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Return the target ``(x − z)/max(1 − t, t_eps)`` (B, N, C): the true x through :meth:`predict`'s clamp."""
        return self.flow.velocity_from_x(x, z, t)
