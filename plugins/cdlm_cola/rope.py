"""Rotary position embeddings of the two Cola networks, computed from explicit positions (spec §2.3, §3.3).

* DiT: rotary-embedding-torch ``freqs_for="lang"`` semantics, θ = 1e4, **interleaved** pairs
  ``(x[2j], x[2j+1])`` on the first ``rope_dim`` channels of each head; the rest pass through.
* VAE: NeoX **half-split** pairs ``(x[j], x[j + hd/2])`` over the whole head, θ = 5e5.

Both are evaluated in fp32 from the positions given, at every call (once per block on the DiT's generation fast
path, whose positions do not change within a block). Nothing is cached by sequence length: the reference's
length-keyed cache returns canonical positions for explicit ones (hazard H1, spec §13).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cdlm.errors import DataError

RopeLayout = Literal["interleaved", "half"]
"""How rotated channels pair up: DiT ``interleaved`` (2j, 2j+1), VAE ``half`` (j, j + d/2)."""


def inv_freq(dim: int, theta: float, device: torch.device | str | None = None) -> Tensor:
    """Return the (dim/2,) fp32 inverse frequencies ``θ^(−2j/dim)`` (the DiT's ``rope.freqs`` buffer)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def rope_angles(positions: Tensor, dim: int, theta: float, layout: RopeLayout) -> Tensor:
    """Return the rotation angle of every rotated channel at every position, fp32.

    Args:
        positions: (L,) integer positions.
        dim: rotated channels (DiT ``rope_dim``, VAE head_dim); even.
        theta: RoPE base.
        layout: ``interleaved`` repeats each pair angle twice in place ``[θ0, θ0, θ1, θ1, …]``;
            ``half`` lays them out ``[θ0, θ1, …, θ0, θ1, …]``.

    Returns:
        (L, dim) fp32 angles ``position · θ^(−2j/dim)`` of pair j.
    """
    freqs = positions.to(torch.float32)[:, None] * inv_freq(dim, theta, positions.device)[None, :]  # (L, dim/2)
    if layout == "interleaved":
        return freqs.repeat_interleave(2, dim=-1)  # (L, dim)
    return torch.cat([freqs, freqs], dim=-1)  # (L, dim)


def _swap(x: Tensor, layout: RopeLayout) -> Tensor:
    """Return each channel's partner in its pair: ``(x_odd, x_even)`` per pair (the sign is in the sin table)."""
    if layout == "interleaved":
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., d)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([second, first], dim=-1)


def _signed(sin: Tensor, layout: RopeLayout) -> Tensor:
    """Give the sines the rotation's sign: −sin on the first channel of every pair, so ``x·cos + swap(x)·sin``."""
    if layout == "interleaved":
        pairs = sin.unflatten(-1, (-1, 2))  # (L, d/2, 2)
        return torch.stack([-pairs[..., 0], pairs[..., 1]], dim=-1).flatten(-2)
    first, second = sin.chunk(2, dim=-1)
    return torch.cat([-first, second], dim=-1)


@dataclass(frozen=True)
class Rotary:
    """The cos / sin tables of one set of positions, applied to (L, nh, hd) queries or keys.

    Attributes:
        cos: (L, d) fp32 cosines of the angles.
        sin: (L, d) fp32 sines with the rotation's sign: negative on the first channel of every pair.
        layout: channel pairing.
    """

    cos: Tensor
    sin: Tensor
    layout: RopeLayout

    @classmethod
    def at(cls, positions: Tensor, dim: int, theta: float, layout: RopeLayout, width: int | None = None) -> Rotary:
        """Build the tables for ``positions`` (L,); see :func:`rope_angles`.

        ``width`` > dim (interleaved only) extends the tables over the whole head (cos 1, sin 0 past ``dim``), so
        that a call needs no split and concatenation; the pass-through channels come out as ``x·1 + partner·0 = x``.
        """
        if width is not None and width > dim and layout != "interleaved":
            raise DataError(f"Rotary.at: width {width} > dim {dim} needs the interleaved layout, got {layout!r}")
        angles = rope_angles(positions, dim, theta, layout)  # (L, d)
        cos, sin = angles.cos(), _signed(angles.sin(), layout)
        if width is not None and width > dim:
            cos, sin = F.pad(cos, (0, width - dim), value=1.0), F.pad(sin, (0, width - dim))  # (L, width)
        return cls(cos, sin, layout)

    def __call__(self, x: Tensor) -> Tensor:
        """Rotate the first d channels of x (L, nh, hd) in fp32; return x's dtype (L, nh, hd)."""
        d = self.cos.shape[-1]
        x32 = x.float()
        cos, sin = self.cos[:, None, :], self.sin[:, None, :]  # (L, 1, d), broadcast over heads
        if d == x.shape[-1]:  # whole-head tables: no split
            return torch.addcmul(x32 * cos, _swap(x32, self.layout), sin).to(x.dtype)
        rot, rest = x32[..., :d], x32[..., d:]
        out = rot * cos + _swap(rot, self.layout) * sin
        return torch.cat([out, rest], dim=-1).to(x.dtype)
