"""ELF's conditioning: the self-conditioning guidance scale w and, for seq2seq, the clean condition prefix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ElfCond:
    """Per-row conditioning of the ELF network.

    Attributes:
        sc_scale: (B,) fp32 self-conditioning guidance scale w, fed raw to the SC-CFG tokens (spec §1.2 step 4).
        values: (B, L, C) clean condition latents x0 (only read where ``mask``), or None when unconditional.
        mask: (B, L) bool, True on condition positions, or None when unconditional.
    """

    sc_scale: Tensor
    values: Tensor | None = None
    mask: Tensor | None = None

    def with_null_rows(self) -> ElfCond:
        """Return 2B rows: these B conditional rows, then B unconditional rows (condition latents zeroed, spec §4.2)."""
        sc = torch.cat([self.sc_scale, self.sc_scale])
        if self.values is None or self.mask is None:
            return ElfCond(sc)
        return ElfCond(sc, torch.cat([self.values, torch.zeros_like(self.values)]), torch.cat([self.mask, self.mask]))

    def restore(self, u: Tensor, fill: Tensor | float | None = None) -> Tensor:
        """Pin condition positions of u (B, L, C): to ``fill`` when given, else to the condition latents."""
        if self.mask is None:
            return u
        pinned = self.values if fill is None else torch.as_tensor(fill, dtype=u.dtype, device=u.device)
        return torch.where(self.mask[..., None], pinned, u)
