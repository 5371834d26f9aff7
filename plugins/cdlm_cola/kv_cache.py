"""Per-sample key/value history of one attention layer, for block-wise generation (spec §2.3, §3.3).

Samples keep separate histories of different lengths; a read lays them out in the NA order
``[cache_0 ; new_0 ; cache_1 ; new_1 ; …]`` so that every sample's new entries are the tail of its keys.
What a key *is* when stored is the owner's choice: the DiT stores keys after qk-norm and before RoPE, the VAE
raw keys before k_norm; RoPE (and the VAE's k_norm) is applied to the whole history at every call, except on
the DiT's per-block fast path, where :class:`BlockKV` holds the history laid out (padded, keys rotated) once
for all the calls of one generation block.
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

    def flat(self) -> tuple[Tensor, Tensor]:
        """Return every sample's history, concatenated in sample order: keys and values (ΣH, …)."""
        return torch.cat(self._k), torch.cat(self._v)


class BlockKV:
    """One layer's keys and values for every call of one generation block, whose history does not change.

    The history is laid out once in the padded per-block layout (:func:`~cdlm_cola.layout.padded_block_layout`),
    heads first for batched matmuls: one row of W slots per sample and head, the last n of them for the call's
    new entries, which each call writes in place instead of concatenating the history again.

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
