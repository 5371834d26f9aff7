"""Per-sample key/value history of one attention layer, for block-wise generation (spec §2.3, §3.3).

Samples keep separate histories of different lengths; a read lays them out in the NA order
``[cache_0 ; new_0 ; cache_1 ; new_1 ; …]`` so that every sample's new entries are the tail of its keys.
What a key *is* when stored is the owner's choice: the DiT stores keys after qk-norm and before RoPE, the VAE
raw keys before k_norm; RoPE (and the VAE's k_norm) is applied to the whole history at every call, except on
the DiT's per-block fast path, where :class:`BlockKV` holds the history laid out (and its keys rotated) once for
all the calls of one generation block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class KVCache:
    """Keys and values of one layer, one tensor per sample, appended block by block."""

    def __init__(self) -> None:
        self._k: list[Tensor] = []  # per sample (len_i, …)
        self._v: list[Tensor] = []

    def clear(self) -> None:
        """Forget every sample's history (the reference's ``set_kv_cache``)."""
        self._k, self._v = [], []

    @property
    def lengths(self) -> list[int]:
        """Cached entries per sample; empty when nothing is cached."""
        return [k.shape[0] for k in self._k]

    def extend(
        self, k: Tensor, v: Tensor, q_lens: Sequence[int], *, store: bool, readers: Sequence[bool] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return the full keys and values, per sample ``[cache_i ; new_i]``, keeping them when ``store``.

        Args:
            k: (ΣLq, …) new keys of all samples, concatenated.
            v: (ΣLq, …) new values.
            q_lens: new entries per sample.
            store: append the new entries to the history (a commit); otherwise the history is unchanged.
            readers: per sample of the call, True if it continues a cached sample (the True samples map, in
                order, onto the cached ones) or False if it is a fresh sequence with no history, e.g. the
                unconditional rows of a batched classifier-free guidance call. None: every sample continues.
                Only reads may mix the two; a commit (``store``) continues every sample.

        Returns:
            Keys and values (ΣLk, …) with ``Lk_i = cached_i + q_len_i`` (``q_len_i`` for a fresh sample).
        """
        if not self._k and not store:
            return k, v
        new_k, new_v = k.split(list(q_lens)), v.split(list(q_lens))
        if not self._k:  # first commit: own copies, not views into the projection output
            full_k, full_v = [t.clone() for t in new_k], [t.clone() for t in new_v]
        else:
            assert readers is None or not store, "a commit continues every sample"
            past = iter(zip(self._k, self._v, strict=True))
            full_k, full_v = [], []
            for i, (nk, nv) in enumerate(zip(new_k, new_v, strict=True)):
                if readers is not None and not readers[i]:
                    full_k.append(nk)
                    full_v.append(nv)
                    continue
                ck, cv = next(past)
                full_k.append(torch.cat([ck, nk]))
                full_v.append(torch.cat([cv, nv]))
        if store:
            self._k, self._v = full_k, full_v
        return torch.cat(full_k), torch.cat(full_v)

    def with_room(self, q_lens: Sequence[int], readers: Sequence[bool] | None = None) -> tuple[Tensor, Tensor]:
        """Return the history as a read of :meth:`extend` lays it out, with zeros where the new entries go.

        Args:
            q_lens: new entries per sample of the call.
            readers: as in :meth:`extend`.

        Returns:
            New keys and values (ΣLk, …), per sample ``[cache_i ; 0 (q_len_i rows)]``; the cache must hold history.
        """
        n, k, v = sum(q_lens), self._k[0], self._v[0]
        return self.extend(
            k.new_zeros(n, *k.shape[1:]), v.new_zeros(n, *v.shape[1:]), q_lens, store=False, readers=readers
        )


class BlockKV:
    """One layer's keys and values for every call of one generation block, whose history does not change.

    The history is laid out once, in the call's NA order (:meth:`KVCache.with_room`), and each call writes its
    new entries into their rows in place instead of concatenating the history again.

    Args:
        k: (ΣLk, …) history keys, in the form the owner attends with (the DiT's are already rotated).
        v: (ΣLk, …) history values.
        slots: (ΣLq,) int64, the rows of the new entries.
    """

    def __init__(self, k: Tensor, v: Tensor, slots: Tensor) -> None:
        self.k, self.v, self.slots = k, v, slots

    def fill(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write a call's new keys and values (ΣLq, …) into their slots; return all of them (ΣLk, …)."""
        self.k.index_copy_(0, self.slots, k)
        self.v.index_copy_(0, self.slots, v)
        return self.k, self.v
