"""The NA (flatten-concat) layout of Cola: per-sample lengths, positions and block-causal masks (spec §4).

All samples are concatenated along one axis with no padding. ``k_lens[i]`` is the number of keys of sample i
(cached history plus the current query), ``q_lens[i] <= k_lens[i]`` the number of queries, which are the
*tail* of that sample's keys. Positions restart at 0 in every sample. Masks are additive, shaped
(1, 1, ΣLq, ΣLk): 0 where attention is allowed, ``finfo(dtype).min`` elsewhere. :class:`NaAttention` carries
what the layers of one call share; :class:`BlockAttention` and :class:`BlockPlan` carry it for every call of a
generation block (the DiT's fast path), in a padded batched layout instead (:func:`padded_block_layout`).
A call reads the history from a :class:`~cdlm_cola.kv_cache.KVCache` it is given; a committing call returns each
layer's history with its own entries appended, and the caller keeps it (nothing is stored on a module).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdlm.errors import DataError
from cdlm_cola.kv_cache import BlockKV, LayerKV
from cdlm_cola.rope import Rotary

Lengths = Tensor | Sequence[int]
"""Per-sample lengths: a (B,) or (B, 1) integer tensor (the reference's ``txt_shape``) or a list of ints."""

HeadTable = dict[float, tuple[Tensor, dict[nn.Module, Tensor]]]
"""The DiT's timestep embedding (1, E) and every AdaLN head's output (1, out) by timestep value, made once.

Generation shares one across the plans of all its blocks (their Euler grids repeat the same timesteps); it
holds outputs of the weights it was made with, so it lives no longer than one generation."""


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
        raise DataError(
            f"the KV cache holds {len(history)} samples but the call has {len(q_lens)}; pass the cache of these samples"
        )
    for i, (k, q, c) in enumerate(zip(k_lens, q_lens, history, strict=True)):
        if k != c + q:
            raise DataError(f"k_lens[{i}] = {k}, expected {c + q}: {c} cached + {q} queries (Q is the tail of K)")


def per_token_timesteps(
    timestep: Tensor | float, q_lens: list[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Broadcast a timestep to one per query row (spec §3.2 step 2).

    Args:
        timestep: a number or 0-d/(1,) tensor (all rows), (ΣLq,) per row, or (B,) per sample (repeated by
            ``q_lens``). When B = ΣLq the per-row reading wins, as in the reference.
        q_lens: queries per sample.
        dtype: dtype given to a Python number (the trunk's dtype, as in the reference).
        device: where the rows live.

    Returns:
        (ΣLq,) timesteps on the 0..1000 scale.

    Raises:
        DataError: the timestep has neither 1, ΣLq nor B entries.
    """
    t = torch.as_tensor(timestep, dtype=None if isinstance(timestep, Tensor) else dtype, device=device).reshape(-1)
    n_rows = sum(q_lens)
    if t.numel() == 1:
        return t.expand(n_rows)
    if t.numel() == n_rows:
        return t
    if t.numel() == len(q_lens):
        return t.repeat_interleave(torch.tensor(q_lens, device=device))
    raise DataError(f"timestep: expected 1, {n_rows} (per row) or {len(q_lens)} (per sample) values, got {t.numel()}")


def check_overrides(
    k_lens: list[int], q_lens: list[int], k_pos: Tensor | None, q_pos: Tensor | None, mask: Tensor | None
) -> int:
    """Check explicit RoPE positions (ΣLk,), (ΣLq,) and a mask against the call's lengths.

    The mask is (1, 1, ΣLq, ΣLk) over the NA layout, or, when every sample has the same lengths, per sample:
    (1 or B, 1, Lq, Lk), and then the call attends as a batch (no mask across samples, linear in B).

    Returns:
        The samples attended as one batch: B for a per-sample mask, else 1.
    """
    n_k, n_q = sum(k_lens), sum(q_lens)
    if (k_pos is None) != (q_pos is None):
        raise DataError("k_positions and q_positions must be given together (explicit RoPE positions)")
    if k_pos is not None and q_pos is not None and (k_pos.shape != (n_k,) or q_pos.shape != (n_q,)):
        found = (tuple(k_pos.shape), tuple(q_pos.shape))
        raise DataError(f"k_positions / q_positions: expected shapes ({n_k},) / ({n_q},), got {found}")
    if mask is None or tuple(mask.shape[-2:]) == (n_q, n_k):
        return 1
    equal = len(set(k_lens)) == 1 and len(set(q_lens)) == 1
    if equal and tuple(mask.shape[-2:]) == (q_lens[0], k_lens[0]) and mask.shape[0] in (1, len(q_lens)):
        return len(q_lens)
    raise DataError(
        f"mask: expected (1, 1, {n_q}, {n_k}) for ΣLq = {n_q}, ΣLk = {n_k} (or (1 or B, 1, Lq, Lk) per sample for "
        f"samples of equal lengths), got {tuple(mask.shape)}"
    )


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


def padded_block_layout(
    history: Sequence[int], n: int, block_size: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> tuple[int, Tensor, Tensor]:
    """Lay out one generation call's samples side by side, padded, for batched attention (the DiT's fast path).

    Every sample has ``n`` queries after ``history[i]`` cached keys. Its keys go in one row of width
    ``W = max(history) + n``, right-aligned: padding, then its history, then its n new keys in the last n slots,
    so that every call writes its new keys into the same slots. Attention is invariant to the order of the keys,
    so this gives the numbers of the NA layout (spec §4.2) up to the order of the softmax sums.

    Args:
        history: cached entries per sample (0 for a fresh sequence).
        n: queries per sample (the tail of its keys).
        block_size: bs, for the block-causal rule.
        dtype: floating dtype of the mask.
        device: where to build it.

    Returns:
        W; the slots (ΣH,) int64 of the history entries, samples concatenated, on the flat (B·W) key axis; and
        the (B, n, W) additive mask (padding and the block-causal rule).
    """
    hist = torch.tensor(list(history), dtype=torch.long, device=device)  # (B,)
    width = max(history, default=0) + n
    start = width - n - hist  # (B,) the first history slot of each sample
    k_pos = torch.arange(width, device=device)[None] - start[:, None]  # (B, W), < 0 on padding
    q_pos = hist[:, None] + torch.arange(n, device=device)[None]  # (B, n)
    allowed = (k_pos >= 0)[:, None] & ((q_pos // block_size)[..., None] >= (k_pos // block_size)[:, None])  # (B, n, W)
    sample, local = _local_index(history, device)
    slots = sample * width + start[sample] + local  # (ΣH,)
    return width, slots, _additive(allowed, dtype)[0, 0]  # (B, n, W)


@dataclass(frozen=True)
class NaAttention:
    """What every attention layer of one NA forward shares: query split, RoPE tables, mask, cache mode.

    Attributes:
        q_lens: queries per sample.
        rot_q: RoPE at the query positions (ΣLq).
        rot_k: RoPE at the key positions (ΣLk).
        mask: (1, 1, ΣLq, ΣLk) additive mask, or None for unmasked attention (VAE ``block_causal=False``).
        commit: every layer also returns its history with the new keys and values appended.
        readers: per sample, whether it reads its cached history or is a fresh sequence (see
            :meth:`LayerKV.read`); None when every sample reads it.
        batch: B when the B samples have equal lengths and ``mask`` is per sample (1 or B, 1, Lq, Lk): they
            attend as a batch; 1 for the NA layout.
    """

    q_lens: list[int]
    rot_q: Rotary
    rot_k: Rotary
    mask: Tensor | None
    commit: bool = False
    readers: list[bool] | None = None
    batch: int = 1

    def history(self, cache: LayerKV | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, LayerKV | None]:
        """Return the keys and values (ΣLk, …) to attend to, the new ones after the cached ones when reading.

        Also returns, on a commit, the layer's history with the new entries appended (else None); ``cache`` is
        left as it is.
        """
        if self.commit:
            new = (cache or LayerKV()).appended(k, v, self.q_lens)
            return *new.flat(), new
        if cache is None:
            return k, v, None
        return *cache.read(k, v, self.q_lens, self.readers), None

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Rotate q (ΣLq, nh, hd) and k (ΣLk, nh, hd), attend over v (ΣLk, nh, hd); return (ΣLq, nh·hd)."""
        q, k = self.rot_q(q), self.rot_k(k)
        if self.batch == 1:
            return _attention(q, k, v, self.mask)
        mask = None if self.mask is None else self.mask.to(q.dtype)
        q, k, v = (x.unflatten(0, (self.batch, -1)).transpose(1, 2) for x in (q, k, v))  # (B, nh, L, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, Lq, hd)
        return out.transpose(1, 2).flatten(2).flatten(0, 1)  # (ΣLq, nh·hd)


@dataclass(frozen=True)
class BlockAttention:
    """The attention of every call of one generation block, made once for the block (the DiT's fast path).

    Between the Euler steps of a block the rows, their positions and the history stay the same. The samples sit
    side by side, padded (:func:`padded_block_layout`), and attend in batched matmuls, the reference's explicit
    ``softmax(q·kᵀ/√hd + mask)·v``: no (ΣLq, ΣLk) mask across samples, and at these sizes faster than SDPA's
    fused kernel. The history keys are rotated once (:class:`BlockKV`); each call rotates only its queries and
    new keys, the keys at the query positions (Q is the tail of K). Used like :class:`NaAttention`:
    ``attend(q, *history(…))``.

    Attributes:
        rot_q: RoPE at the query positions (B·n), tables over the whole head.
        bias: (B·nh, n, W) additive mask per sample and head (padding and the block-causal rule), zeros when
            every key is visible.
        n: queries per sample.
    """

    rot_q: Rotary
    bias: Tensor
    n: int

    def history(self, kv: BlockKV | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, None]:
        """Rotate the new keys (B·n, nh, hd); return all keys and values (B, nh, W, hd), keys rotated (no commit)."""
        k = self.rot_q(k).unflatten(0, (-1, self.n)).transpose(1, 2)  # (B, nh, n, hd)
        v = v.unflatten(0, (-1, self.n)).transpose(1, 2)
        return (k, v, None) if kv is None else (*kv.fill(k, v), None)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Rotate q (B·n, nh, hd), attend over the keys k and values v (B, nh, W, hd); return (B·n, nh·hd)."""
        rows, heads, dim = q.shape
        q = self.rot_q(q).unflatten(0, (-1, self.n)).transpose(1, 2).flatten(0, 1)  # (B·nh, n, hd)
        scores = torch.baddbmm(self.bias, q, k.flatten(0, 1).transpose(1, 2), alpha=dim**-0.5)  # (B·nh, n, W)
        out = torch.bmm(scores.softmax(-1), v.flatten(0, 1))  # (B·nh, n, hd)
        return out.unflatten(0, (-1, heads)).transpose(1, 2).reshape(rows, heads * dim)  # (B·n, nh·hd)


@dataclass(frozen=True)
class BlockPlan:
    """What every DiT call of one generation block shares (:meth:`ColaDiT.plan <cdlm_cola.dit.ColaDiT.plan>`).

    Attributes:
        q_lens: queries per sample (all equal).
        attention: the block's mask and query RoPE.
        kv: per layer, the laid-out history with its keys rotated, or None when the rows read no history.
        heads: the timestep table its calls read and fill, shared with the generation's other plans.
    """

    q_lens: list[int]
    attention: BlockAttention
    kv: list[BlockKV | None]
    heads: HeadTable


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
