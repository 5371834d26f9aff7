"""A deterministic, resumable, sharded batch iterator over packed rows.

Epoch ``e`` visits the rows in the order of a permutation drawn from ``numpy.random.default_rng([seed, e])``;
the same on every process. With P processes, process r takes the strided slice ``perm[r::P]`` (cut to
``R // P`` rows so that every process has the same count) and cuts it into batches of ``batch_size``,
dropping the incomplete last batch. All processes therefore yield the same number of batches per epoch, in
lockstep, and together see P·batch_size distinct rows per step. The position is the number of batches already
yielded in the current epoch; restoring ``{epoch, position}`` replays exactly the batches that would have come
next. The seed must be the same on every process (the run seed, not ``seed + rank``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from cdlm.errors import DataError
from cdlm.interfaces import TokenBatch


class ResumableLoader:
    """Endless iterator of :class:`TokenBatch` micro-batches whose position can be saved and restored.

    Args:
        rows: every row of the corpus: ids (R, L) int64, mask and cond_mask (R, L) bool.
        batch_size: rows per batch on this process.
        seed: permutation seed, identical on every process.
        process_index: this process's rank r.
        num_processes: the world size P.

    Raises:
        DataError: there are too few rows for one batch on every process.
    """

    def __init__(
        self, rows: TokenBatch, batch_size: int, *, seed: int, process_index: int = 0, num_processes: int = 1
    ) -> None:
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.batches_per_epoch = (rows.ids.shape[0] // num_processes) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{rows.ids.shape[0]} rows cannot fill one batch of train.batch_size={batch_size} on each of "
                f"{num_processes} process(es); lower train.batch_size, shorten data.seq_len or add data"
            )
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, this process's row order)

    def __iter__(self) -> Iterator[TokenBatch]:
        return self

    def __next__(self) -> TokenBatch:
        order = self._epoch_order()
        start = self.position * self.batch_size
        idx = torch.from_numpy(order[start : start + self.batch_size])  # (batch_size,)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return TokenBatch(self.rows.ids[idx], self.rows.mask[idx], self.rows.cond_mask[idx])

    def _epoch_order(self) -> np.ndarray:
        """Return this process's row indices for the current epoch (cached per epoch)."""
        if self._order is None or self._order[0] != self.epoch:
            n = self.rows.ids.shape[0]
            rng = np.random.default_rng([self.seed % 2**64, self.epoch])  # SeedSequence entropy must be >= 0
            perm = rng.permutation(n)  # (R,)
            local = perm[self.process_index :: self.num_processes][: n // self.num_processes]
            self._order = (self.epoch, local)
        return self._order[1]

    def state_dict(self) -> dict[str, int]:
        """Return ``{"epoch", "position"}``: where the next batch comes from."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Raises:
            DataError: the position lies outside an epoch of this loader (the data or batch size changed).
        """
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise DataError(
                f"loader state {dict(state)} does not fit this loader ({self.batches_per_epoch} batches per epoch); "
                "were data or train.batch_size changed since the checkpoint?"
            )
        self.epoch, self.position = epoch, position
