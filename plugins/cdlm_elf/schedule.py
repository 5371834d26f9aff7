"""ELF's flow schedule: logit-normal training times, the noise-scaled path and x-prediction (ELF spec §3.1–3.2).

ELF already uses the core time convention (t = 0 noise, t = 1 data), so nothing is converted here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdlm.flow import RectifiedFlow
from cdlm.interfaces import FlowSchedule
from cdlm.sampling.grids import logit_normal_times
from cdlm.sampling.types import Prediction
from cdlm_elf.config import ElfConfig


class ElfSchedule(FlowSchedule):
    """The ELF path ``z_t = t·x + (1 − t)·s·ε`` with an x-predicting network.

    Args:
        cfg: the ELF model config (``noise_scale``, ``t_eps``, ``time_schedule``, ``p_mean``, ``p_std``).
    """

    def __init__(self, cfg: ElfConfig) -> None:
        self.cfg = cfg
        self.flow = RectifiedFlow(noise_scale=cfg.noise_scale, t_eps=cfg.t_eps)

    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` training times: ``sigmoid(p_std·N(0, 1) + p_mean)`` or ``U[0, 1)`` (spec §3.2 step 1)."""
        if self.cfg.time_schedule == "logit_normal":
            return logit_normal_times(n, generator, self.cfg.p_mean, self.cfg.p_std)
        return torch.rand(n, generator=generator, dtype=torch.float32, device=generator.device)

    def interpolate(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Return ``z_t = t·x + (1 − t)·s·eps`` for x, eps (B, L, C) and times t (B,)."""
        return self.flow.interpolate(x, eps, t)

    def predict(self, out: Tensor, z: Tensor, t: Tensor) -> Prediction:
        """Read the raw output (B, L, C) as x̂; ``v̂ = (x̂ − z)/max(1 − t, t_eps)`` (spec §3.1), in fp32."""
        x = out.float()
        return Prediction(x=x, v=self.flow.velocity_from_x(x, z.float(), t.float()))
