"""The NA (flatten-concat) layout of Cola: per-sample lengths, positions and block-causal masks (spec §4).

All samples are concatenated along one axis with no padding. ``k_lens[i]`` is the number of keys of sample i
(cached history plus the current query), ``q_lens[i] <= k_lens[i]`` the number of queries, which are the
*tail* of that sample's keys. Positions restart at 0 in every sample. Masks are additive, shaped
(1, 1, ΣLq, ΣLk): 0 where attention is allowed, ``finfo(dtype).min`` elsewhere. :class:`NaAttention` carries
what the layers of one call share; :class:`BlockAttention` and :class:`BlockPlan` carry it for every call of a
generation block (the DiT's fast path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cdlm.errors import DataError
from cdlm_cola.kv_cache import BlockKV, KVCache
from cdlm_cola.rope import Rotary

Lengths = Tensor | Sequence[int]
"""Per-sample lengths: a (B,) or (B, 1) integer tensor (the reference's ``txt_shape``) or a list of ints."""


def as_lengths(lens: Lengths, name: str) -> list[int]:
    """Return per-sample lengths as a list of non-negative ints.

    Args:
        lens: (B,) or (B, 1) integer tensor, or a sequence of ints.
        name: the argument's name, for the error message.

    Raises:
        DataError: a length is negative or the tensor has more than one length per sample.
    """
    if isinstance(lens, Tensor):
        if lens.ndim > 2 or (lens.ndim == 2 and lens.shape[1] != 1):
            raise DataError(f"{name}: expected a (B,) or (B, 1) tensor of lengths, got shape {tuple(lens.shape)}")
        values = [int(v) for v in lens.flatten().tolist()]
    else:
        values = [int(v) for v in lens]
    if any(v < 0 for v in values):
        raise DataError(f"{name}: lengths must be >= 0, got {values}")
    return values


def check_lengths(k_lens: Sequence[int], q_lens: Sequence[int], cached: Sequence[int], n_rows: int) -> None:
    """Check that a call's lengths describe its rows and the cached history.

    Args:
        k_lens: keys per sample; must equal cached + queries.
        q_lens: queries per sample; must sum to ``n_rows``.
        cached: history entries per sample that the call reads (empty when it reads none).
        n_rows: rows of the call's input.

    Raises:
        DataError: naming the first inconsistency.
    """
    if len(k_lens) != len(q_lens):
        raise DataError(f"k_lens has {len(k_lens)} samples but q_lens has {len(q_lens)}")
    if sum(q_lens) != n_rows:
        raise DataError(f"q_lens {list(q_lens)} sum to {sum(q_lens)} but the input has {n_rows} rows")
    history = list(cached) or [0] * len(q_lens)
    if len(history) != len(q_lens):
        raise DataError(f"the KV cache holds {len(history)} samples but the call has {len(q_lens)}; clear it first")
    for i, (k, q, c) in enumerate(zip(k_lens, q_lens, history, strict=True)):
        if k != c + q:
            raise DataError(f"k_lens[{i}] = {k}, expected {c + q}: {c} cached + {q} queries (Q is the tail of K)")


def _local_index(lens: Sequence[int], device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    """Return (sample id, index within the sample), each (ΣL,) int64, for concatenated samples."""
    lens_t = torch.tensor(lens, dtype=torch.long, device=device)  # (B,)
    sample = torch.repeat_interleave(torch.arange(len(lens), device=device), lens_t)  # (ΣL,)
    starts = torch.cumsum(lens_t, 0) - lens_t  # (B,)
    local = torch.arange(int(lens_t.sum()), device=device) - starts[sample]  # (ΣL,)
    return sample, local


def k_positions(k_lens: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Return the key positions (ΣLk,) int64: ``0 .. k_len_i − 1`` for every sample."""
    return _local_index(k_lens, device)[1]


def q_positions(k_lens: Sequence[int], q_lens: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Return the query positions (ΣLq,) int64: ``k_len_i − q_len_i .. k_len_i − 1`` (Q is the tail of K)."""
    sample, local = _local_index(q_lens, device)
    offset = torch.tensor([k - q for k, q in zip(k_lens, q_lens, strict=True)], dtype=torch.long, device=device)
    return local + offset[sample]  # (ΣLq,)


def q_slots(k_lens: Sequence[int], q_lens: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Return the row of every query's own key on the key axis (ΣLq,) int64: Q is the tail of each sample's K."""
    sample, _ = _local_index(q_lens, device)
    lens = torch.tensor(k_lens, dtype=torch.long, device=device)  # (B,)
    starts = torch.cumsum(lens, 0) - lens  # (B,)
    return q_positions(k_lens, q_lens, device) + starts[sample]  # (ΣLq,)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a bool (Lq, Lk) pattern into the additive (1, 1, Lq, Lk) mask: 0 allowed, ``finfo.min`` blocked."""
    blocked = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return blocked.masked_fill(allowed, 0.0)[None, None]  # (1, 1, Lq, Lk)


def na_block_causal_mask(
    k_lens: Sequence[int],
    q_lens: Sequence[int],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> Tensor:
    """Build the NA block-causal mask (spec §4.2).

    Query r of sample s attends to key c iff c is in sample s and ``⌊q_pos/bs⌋ ≥ ⌊k_pos/bs⌋``: bidirectional
    within a block, causal across blocks, no cross-sample attention.

    Args:
        k_lens: keys per sample.
        q_lens: queries per sample (the tail of each sample's keys).
        block_size: bs, the owning model's ``config.block_size`` (H5).
        dtype: floating dtype of the mask.
        device: where to build it.

    Returns:
        (1, 1, ΣLq, ΣLk) additive mask.
    """
    k_sample, k_pos = _local_index(k_lens, device)
    q_sample, _ = _local_index(q_lens, device)
    q_pos = q_positions(k_lens, q_lens, device)
    same = q_sample[:, None] == k_sample[None, :]  # (ΣLq, ΣLk)
    causal = (q_pos // block_size)[:, None] >= (k_pos // block_size)[None, :]  # (ΣLq, ΣLk)
    return _additive(same & causal, dtype)


def twol_positions(seq_lens: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """Return the 2L-layout positions (Σ2L,) int64: ``[0..L_i−1, 0..L_i−1]`` per sample (spec §4.3)."""
    sample, local = _local_index([2 * n for n in seq_lens], device)
    lens = torch.tensor(seq_lens, dtype=torch.long, device=device)[sample]  # (Σ2L,)
    return torch.where(local < lens, local, local - lens)


def twol_block_causal_mask(
    seq_lens: Sequence[int],
    block_sizes: int | Sequence[int],
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> Tensor:
    """Build the mask of the 2L training layout ``[clean z_0 (L_i) | noisy z_t (L_i)]`` per sample (spec §4.3).

    Queries and keys both cover the whole 2L row of every sample. Within a sample: a noisy query of block b sees
    clean blocks ``< b`` and its own noisy block; a clean query sees clean blocks ``≤`` its own; nothing else.

    Args:
        seq_lens: L_i, the single-copy length of each sample.
        block_sizes: one block size for all samples, or one per sample.
        dtype: floating dtype of the mask.
        device: where to build it.

    Returns:
        (1, 1, Σ2L, Σ2L) additive mask.
    """
    sizes = [block_sizes] * len(seq_lens) if isinstance(block_sizes, int) else list(block_sizes)
    if len(sizes) != len(seq_lens):
        raise DataError(f"block_sizes: expected one per sample ({len(seq_lens)}), got {len(sizes)}")
    sample, local = _local_index([2 * n for n in seq_lens], device)
    clean = local < torch.tensor(seq_lens, dtype=torch.long, device=device)[sample]  # (Σ2L,)
    block = twol_positions(seq_lens, device) // torch.tensor(sizes, dtype=torch.long, device=device)[sample]
    same = sample[:, None] == sample[None, :]
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_block, k_block = block[:, None], block[None, :]
    allowed = (
        (~q_clean & k_clean & (q_block > k_block))
        | (~q_clean & ~k_clean & (q_block == k_block))
        | (q_clean & k_clean & (q_block >= k_block))
    )  # (Σ2L, Σ2L)
    return _additive(same & allowed, dtype)


@dataclass(frozen=True)
class NaAttention:
    """What every attention layer of one NA forward shares: query split, RoPE tables, mask, cache mode.

    Attributes:
        q_lens: queries per sample.
        rot_q: RoPE at the query positions (ΣLq).
        rot_k: RoPE at the key positions (ΣLk).
        mask: (1, 1, ΣLq, ΣLk) additive mask, or None for unmasked attention (VAE ``block_causal=False``).
        update_kv: commit the new keys and values to the layers' caches.
        readers: per sample, whether it reads its cached history or is a fresh sequence (see
            :meth:`KVCache.extend`); None when every sample reads it.
    """

    q_lens: list[int]
    rot_q: Rotary
    rot_k: Rotary
    mask: Tensor | None
    update_kv: bool
    readers: list[bool] | None = None

    def history(self, cache: KVCache | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Return the keys and values (ΣLk, …) to attend to: the new ones, after the cached ones when reading."""
        if cache is None:
            return k, v
        return cache.extend(k, v, self.q_lens, store=self.update_kv, readers=self.readers)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Rotate q (ΣLq, nh, hd) and k (ΣLk, nh, hd), attend over v (ΣLk, nh, hd); return (ΣLq, nh·hd)."""
        return _attention(self.rot_q(q), self.rot_k(k), v, self.mask)


@dataclass(frozen=True)
class BlockAttention:
    """The NA attention of every call of one generation block, made once for the block (the DiT's fast path).

    Between the Euler steps of a block the rows, their positions and the history stay the same: the mask and
    the query RoPE are built once, the history keys are rotated once (:class:`BlockKV`), and each call rotates
    only its new queries and keys, the keys at the query positions (Q is the tail of K). Rotation is
    elementwise, so the numbers are those of :class:`NaAttention`. Used like it: ``attend(q, *history(…))``.

    Attributes:
        rot_q: RoPE at the query positions (ΣLq).
        mask: (1, 1, ΣLq, ΣLk) additive mask.
    """

    rot_q: Rotary
    mask: Tensor

    def history(self, kv: BlockKV | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate the new keys (ΣLq, nh, hd); return all keys and values (ΣLk, nh, hd), keys rotated."""
        k = self.rot_q(k)
        return (k, v) if kv is None else kv.fill(k, v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Rotate q (ΣLq, nh, hd), attend over the rotated keys k and values v (ΣLk, nh, hd); return (ΣLq, nh·hd)."""
        return _attention(self.rot_q(q), k, v, self.mask)


@dataclass(frozen=True)
class BlockPlan:
    """What every DiT call of one generation block shares (:meth:`ColaDiT.plan <cdlm_cola.dit.ColaDiT.plan>`).

    Attributes:
        q_lens: queries per sample.
        attention: the block's mask and query RoPE.
        kv: per layer, the laid-out history with its keys rotated, or None when the rows read no history.
    """

    q_lens: list[int]
    attention: BlockAttention
    kv: list[BlockKV | None]


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """``softmax(q·kᵀ/√hd + mask)·v``, the reference's explicit attention, through SDPA: (ΣLq, nh·hd).

    Args:
        q: (ΣLq, nh, hd) rotated queries.
        k: (ΣLk, nh, hd) rotated keys.
        v: (ΣLk, nh, hd) values.
        mask: (1, 1, ΣLq, ΣLk) additive mask, or None.
    """
    mask = None if mask is None else mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask
    )  # (1, nh, ΣLq, hd)
    return out[0].transpose(0, 1).flatten(1)  # (ΣLq, nh·hd)
