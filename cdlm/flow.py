"""The canonical rectified-flow path of the core.

Core time convention (every plugin converts to it at its own boundary):
``t = 0`` is noise, ``t = 1`` is data, and the velocity is ``v = dz/dt``. Along the path

    z_t = t · x + (1 − t) · s · eps,        eps ~ N(0, I),  s = noise scale,

the exact velocity is ``v = x − s · eps = (x − z_t) / (1 − t)``. Near ``t = 1`` the division is
clamped: ``v = (x − z) / max(1 − t, t_eps)`` (ELF spec §3.1, ``t_eps = 0.05``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


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
