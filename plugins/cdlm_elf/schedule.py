"""ELF's flow schedule: logit-normal training times on the core's noise-scaled x-prediction path (ELF spec §3.1–3.2).

ELF already uses the core time convention (t = 0 noise, t = 1 data), so nothing is converted here: the path,
the clamped x ↔ v conversion and the training target are :class:`cdlm.flow.XPredictionSchedule`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdlm.flow import XPredictionSchedule
from cdlm.sampling.grids import logit_normal_times
from cdlm_elf.config import ElfConfig


class ElfSchedule(XPredictionSchedule):
    """The ELF path ``z_t = t·x + (1 − t)·s·ε`` with an x-predicting network and ELF's training times.

    Args:
        cfg: the ELF model config (``noise_scale``, ``t_eps``, ``time_schedule``, ``p_mean``, ``p_std``).
    """

    def __init__(self, cfg: ElfConfig) -> None:
        super().__init__(noise_scale=cfg.noise_scale, t_eps=cfg.t_eps)
        self.cfg = cfg

    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` training times: ``sigmoid(p_std·N(0, 1) + p_mean)`` or ``U[0, 1)`` (spec §3.2 step 1)."""
        if self.cfg.time_schedule == "logit_normal":
            return logit_normal_times(n, generator, self.cfg.p_mean, self.cfg.p_std)
        return super().sample_t(n, generator)
