"""Key/value history of Cola's attention layers, for block-wise generation (spec §2.3, §3.3, §6.1).

Generation owns the history: it creates a :class:`KVCache` per network, passes it to the calls that read it
(``cache=``) and replaces it with the one a committing call returns
(:meth:`ColaDiT.commit <cdlm_cola.dit.ColaDiT.commit>`, :meth:`ColaTextVAE.decode_commit
<cdlm_cola.vae.ColaTextVAE.decode_commit>`). Caches are immutable and no module holds one, so a forward has no
side effects and generations sharing a model do not disturb each other.

Samples keep separate histories of different lengths; a read lays them out in the NA order
``[cache_0 ; new_0 ; cache_1 ; new_1 ; …]`` so that every sample's new entries are the tail of its keys.
What a key *is* when stored is the owner's choice: the DiT stores keys after qk-norm and before RoPE, the VAE
raw keys before k_norm; RoPE (and the VAE's k_norm) is applied to the whole history at every call, except on
the DiT's per-block fast path, where :class:`BlockKV` holds the history laid out (padded, keys rotated) once
for all the calls of one generation block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cdlm.errors import DataError


@dataclass(frozen=True)
class LayerKV:
    """Keys and values of one layer, one tensor (len_i, …) per sample; empty before the first commit."""

    k: tuple[Tensor, ...] = ()
    v: tuple[Tensor, ...] = ()

    @property
    def lengths(self) -> list[int]:
        """Cached entries per sample; empty when nothing is cached."""
        return [k.shape[0] for k in self.k]

    def read(
        self, k: Tensor, v: Tensor, q_lens: Sequence[int], readers: Sequence[bool] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return a call's keys and values: per sample ``[cache_i ; new_i]``, or ``new_i`` for a fresh sample.

        Args:
            k: (ΣLq, …) new keys of all samples, concatenated.
            v: (ΣLq, …) new values.
            q_lens: new entries per sample.
            readers: per sample of the call, True if it continues a cached sample (the True samples map, in
                order, onto the cached ones) or False if it is a fresh sequence with no history, e.g. the
                unconditional rows of a batched classifier-free guidance call. None: every sample continues.

        Returns:
            Keys and values (ΣLk, …) with ``Lk_i = cached_i + q_len_i`` (``q_len_i`` for a fresh sample).
        """
        if not self.k:
            return k, v
        past = iter(zip(self.k, self.v, strict=True))
        full_k, full_v = [], []
        for i, (nk, nv) in enumerate(zip(k.split(list(q_lens)), v.split(list(q_lens)), strict=True)):
            if readers is not None and not readers[i]:
                full_k.append(nk)
                full_v.append(nv)
                continue
            ck, cv = next(past)
            full_k.append(torch.cat([ck, nk]))
            full_v.append(torch.cat([cv, nv]))
        return torch.cat(full_k), torch.cat(full_v)

    def appended(self, k: Tensor, v: Tensor, q_lens: Sequence[int]) -> LayerKV:
        """Return this history with a call's new keys and values (ΣLq, …) appended to every sample (a commit)."""
        new_k, new_v = k.split(list(q_lens)), v.split(list(q_lens))
        if not self.k:  # own copies, not views into the projection output
            return LayerKV(tuple(t.clone() for t in new_k), tuple(t.clone() for t in new_v))
        full_k = tuple(torch.cat([c, n]) for c, n in zip(self.k, new_k, strict=True))
        return LayerKV(full_k, tuple(torch.cat([c, n]) for c, n in zip(self.v, new_v, strict=True)))

    def flat(self) -> tuple[Tensor, Tensor]:
        """Return every sample's history, concatenated in sample order: keys and values (ΣH, …)."""
        return torch.cat(self.k), torch.cat(self.v)


@dataclass(frozen=True)
class KVCache:
    """One network's history: a :class:`LayerKV` per attention layer, all holding the same samples."""

    layers: tuple[LayerKV, ...]

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        """Return the cache of a network with ``num_layers`` attention layers before any commit."""
        return cls((LayerKV(),) * num_layers)

    @property
    def lengths(self) -> list[int]:
        """Cached entries per sample; empty when nothing is cached."""
        return self.layers[0].lengths if self.layers else []


def cache_readers(readers: Sequence[bool] | None, n_samples: int) -> list[bool]:
    """Return one cache-reading flag per sample of a call; None: all True (:meth:`~cdlm_cola.dit.ColaDiT.forward`)."""
    if readers is None:
        return [True] * n_samples
    flags = [bool(f) for f in readers]
    if len(flags) != n_samples:
        raise DataError(f"readers: expected one flag per sample ({n_samples}), got {len(flags)}")
    return flags


def read_lengths(cache: KVCache | None, readers: list[bool]) -> list[int]:
    """Return the cached entries each sample of a call reads (0 for a fresh one); [] when it reads none.

    Raises:
        DataError: the samples that read are not as many as the cache holds.
    """
    cached = [] if cache is None else cache.lengths
    if not cached or not any(readers):
        return []
    if sum(readers) != len(cached):
        raise DataError(
            f"readers: {sum(readers)} samples read the KV cache but it holds {len(cached)}; flag True exactly the "
            "samples that continue a cached one, in order"
        )
    past = iter(cached)
    return [next(past) if r else 0 for r in readers]


class BlockKV:
    """One layer's keys and values for every call of one generation block, whose history does not change.

    The history is laid out once in the padded per-block layout (:func:`~cdlm_cola.layout.padded_block_layout`),
    heads first for batched matmuls: one row of W slots per sample and head, the last n of them for the call's
    new entries, which each call writes in place instead of concatenating the history again. It belongs to
    the plan of one block (:class:`~cdlm_cola.layout.BlockPlan`), a copy: the cache it was laid out from is
    untouched.

    Args:
        k: (B, nh, W, hd) keys, in the form the owner attends with (the DiT's are already rotated).
        v: (B, nh, W, hd) values.
    """

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    @classmethod
    def laid_out(cls, k: Tensor, v: Tensor, slots: Tensor, rows: int, width: int) -> BlockKV:
        """Place the history (ΣH, nh, hd), samples concatenated, at ``slots`` (ΣH,) of a zero (B·W) key axis."""

        def place(x: Tensor) -> Tensor:
            flat = x.new_zeros(rows * width, *x.shape[1:]).index_copy_(0, slots, x)  # (B·W, nh, hd)
            return flat.unflatten(0, (rows, width)).transpose(1, 2).contiguous()  # (B, nh, W, hd)

        return cls(place(k), place(v))

    def fill(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a call's new keys and values (B, nh, n, hd) into the last n slots; return all (B, nh, W, hd)."""
        n = k.shape[2]
        self.k[:, :, -n:] = k
        self.v[:, :, -n:] = v
        return self.k, self.v
