"""Cola's flow schedule: the one place where Cola's time convention meets the core's (STYLE §0 rule 2).

Cola (spec §5) runs time the other way: ``z_t = (1 − τ)·z_0 + τ·z_1`` with τ = 1 noise, and the DiT predicts
``z_1 − z_0`` from the timestep ``1000·τ``. The core has t = 0 noise, t = 1 data and ``v = dz/dt``. So

    τ = 1 − t,        v_core = −v_cola,        DiT timestep = time_scale · τ.

Nothing else in the plugin converts: callers hand core times to :meth:`ColaSchedule.model_time` and raw DiT
outputs to :meth:`ColaSchedule.predict`. Cola's own training maths (the 2L layout) stays in τ, never going
through core time, because ``1 − (1 − τ)`` drops the low bits of every τ < 0.5: it draws τ with
:meth:`ColaSchedule.sample_tau` and reads the path in τ here too (:meth:`ColaSchedule.interpolate_tau`,
:meth:`ColaSchedule.dit_time`, :meth:`ColaSchedule.target`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdlm.flow import RectifiedFlow
from cdlm.interfaces import FlowSchedule
from cdlm.sampling.grids import logit_normal_times
from cdlm.sampling.types import Prediction
from cdlm_cola.config import ColaConfig


def to_cola_time(t: Tensor) -> Tensor:
    """Return Cola time τ = 1 − t (1 noise) for core times t (0 noise); the map is its own inverse."""
    return 1.0 - t


to_core_time = to_cola_time  # τ ↦ 1 − τ: the same involution back


class ColaSchedule(FlowSchedule):
    """The Cola path in core form, ``z_t = t·x + (1 − t)·ε``, with a network that predicts Cola's velocity.

    Args:
        cfg: the Cola model section (``time_scale``, ``time_distribution``, ``t_loc``, ``t_scale``).
    """

    def __init__(self, cfg: ColaConfig) -> None:
        self.cfg = cfg
        self.flow = RectifiedFlow(noise_scale=1.0)

    def model_time(self, t: Tensor) -> Tensor:
        """Return the DiT's timestep input ``time_scale·(1 − t)`` (0..1000, 1000 = noise) for core times t."""
        return self.dit_time(to_cola_time(t.float()))

    def dit_time(self, tau: Tensor) -> Tensor:
        """Return the DiT's timestep input ``time_scale·τ`` for Cola times τ (spec §5)."""
        return self.cfg.time_scale * tau

    def interpolate_tau(self, x: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
        """Return Cola's ``z_τ = (1 − τ)·x + τ·ε``, computed in τ (exactly x at τ = 0), as the scripts do (spec §5).

        Args:
            x: (N, ...) clean latents.
            eps: (N, ...) standard-normal noise.
            tau: (N,) Cola times, one per leading index.
        """
        tau = tau.reshape(tau.shape + (1,) * (x.dim() - tau.dim()))  # (N, 1, ...)
        return (1 - tau) * x + tau * eps

    def sample_tau(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` training times in Cola's own time τ (1 = noise), bit for bit as the scripts do (spec §5, §9.2).

        The scripts' ``sample_timestep``: one fp32 draw of ``n`` numbers, ``r ~ N(0, 1)`` then
        ``τ = sigmoid(t_loc + t_scale·r)`` (logit-normal; ``t_loc = 1`` biases toward noise), or ``τ ~ U[0, 1)``.
        The DiT reads ``time_scale·τ`` of exactly these values.

        Args:
            n: number of times.
            generator: the generator of every draw.

        Returns:
            (n,) fp32 Cola times on the generator's device.
        """
        if self.cfg.time_distribution == "logit_normal":
            # randn(n) then sigmoid(r·scale + loc): IEEE + and × commute, so this is sigmoid(loc + scale·r)
            return logit_normal_times(n, generator, self.cfg.t_loc, self.cfg.t_scale)
        return torch.rand(n, generator=generator, dtype=torch.float32, device=generator.device)

    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` training times in core time: ``1 − τ`` of :meth:`sample_tau`'s draw (same generator use).

        Args:
            n: number of times.
            generator: the generator of every draw.

        Returns:
            (n,) fp32 core times on the generator's device.
        """
        return to_core_time(self.sample_tau(n, generator))

    def interpolate(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Return ``z_t = t·x + (1 − t)·ε`` (Cola's ``(1 − τ)·z_0 + τ·z_1``) for x, eps (B, N, C), t (B,)."""
        return self.flow.interpolate(x, eps, t)

    def target(self, x: Tensor, eps: Tensor) -> Tensor:
        """Return what the DiT regresses to, Cola's velocity ``z_1 − z_0 = ε − x`` (B, N, C) (spec §5)."""
        return eps - x

    def predict(self, out: Tensor, z: Tensor, t: Tensor) -> Prediction:
        """Turn a DiT output (B, N, C) into the fp32 core prediction: ``v = −out``, ``x = z + (1 − t)·v``.

        Args:
            out: (B, N, C) raw DiT output, Cola velocity ``z_1 − z_0``.
            z: (B, N, C) the state it was evaluated at.
            t: (B,) core times (a position pinned at t = 1 gets x = z, as it should).
        """
        v = -out.float()
        return Prediction(x=self.flow.x_from_velocity(v, z.float(), t.float()), v=v)
