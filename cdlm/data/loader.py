"""A deterministic, resumable, sharded batch iterator over packed rows.

Epoch ``e`` visits the rows in the order of a permutation drawn from ``numpy.random.default_rng([seed, e])``;
the same on every process. With P processes, process r takes the strided slice ``perm[r::P]`` (cut to
``R // P`` rows so that every process has the same count) and cuts it into batches of ``batch_size``,
dropping the incomplete last batch. All processes therefore yield the same number of batches per epoch, in
lockstep, and together see P·batch_size distinct rows per step. The position is the number of batches already
yielded in the current epoch; restoring ``{epoch, position}`` replays exactly the batches that would have come
next. The seed must be the same on every process (the run seed, not ``seed + rank``).

Rows are an in-memory :class:`~cdlm.interfaces.TokenBatch`, memory-mapped cached rows
(:class:`~cdlm.data.cache.TokenRows`, read one batch at a time), or a :class:`~cdlm.data.stream.RowStream`
(``data.streaming``), which is read in order instead (:class:`~cdlm.data.stream.StreamReader`; its state adds
the stream position).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from cdlm.data.cache import TokenRows
from cdlm.data.stream import RowStream, StreamReader
from cdlm.errors import DataError
from cdlm.interfaces import TokenBatch


class ResumableLoader:
    """Endless iterator of :class:`TokenBatch` micro-batches whose position can be saved and restored.

    Args:
        rows: every row of the corpus (a TokenBatch: ids (R, L) int64, mask and cond_mask (R, L) bool, or
            cached rows), or a stream of rows.
        batch_size: rows per batch on this process.
        seed: permutation seed, identical on every process.
        process_index: this process's rank r.
        num_processes: the world size P.

    Raises:
        DataError: there are too few rows for one batch on every process.
    """

    def __init__(
        self,
        rows: TokenBatch | TokenRows | RowStream,
        batch_size: int,
        *,
        seed: int,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> None:
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self._stream: StreamReader | None = None
        self.num_rows = 0  # streams are not counted
        if isinstance(rows, RowStream):
            self._stream = StreamReader(rows, batch_size, process_index, num_processes)
        else:
            self.num_rows = len(rows) if isinstance(rows, TokenRows) else rows.ids.shape[0]
        self.batches_per_epoch = (self.num_rows // num_processes) // batch_size
        if self.batches_per_epoch == 0 and self._stream is None:
            raise DataError(
                f"{self.num_rows} rows cannot fill one batch of train.batch_size={batch_size} on each of "
                f"{num_processes} process(es); lower train.batch_size, shorten data.seq_len or add data"
            )
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, this process's row order)

    def __iter__(self) -> Iterator[TokenBatch]:
        return self

    def __next__(self) -> TokenBatch:
        if self._stream is not None:
            return next(self._stream)
        order = self._epoch_order()
        start = self.position * self.batch_size
        idx = order[start : start + self.batch_size]  # (batch_size,)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if isinstance(self.rows, TokenRows):
            return self.rows.take(idx)
        assert isinstance(self.rows, TokenBatch)
        t = torch.from_numpy(idx)
        return TokenBatch(self.rows.ids[t], self.rows.mask[t], self.rows.cond_mask[t])

    def _epoch_order(self) -> np.ndarray:
        """Return this process's row indices for the current epoch (cached per epoch)."""
        if self._order is None or self._order[0] != self.epoch:
            n = self.num_rows
            rng = np.random.default_rng([self.seed % 2**64, self.epoch])  # SeedSequence entropy must be >= 0
            perm = rng.permutation(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64))  # (R,); = permutation(n)
            local = perm[self.process_index :: self.num_processes][: n // self.num_processes]
            self._order = (self.epoch, local)
        return self._order[1]

    def state_dict(self) -> dict[str, int]:
        """Return ``{"epoch", "position"}`` (streams add ``doc`` and ``offset``): where the next batch comes from."""
        return (
            self._stream.state_dict() if self._stream is not None else {"epoch": self.epoch, "position": self.position}
        )

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Raises:
            DataError: the position lies outside an epoch of this loader (the data or batch size changed).
        """
        if self._stream is not None:
            self._stream.load_state_dict(state)
            return
        epoch, position = int(state["epoch"]), int(state["position"])
        if "doc" in state or epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise DataError(
                f"loader state {dict(state)} does not fit this loader ({self.batches_per_epoch} batches per epoch); "
                "were data or train.batch_size changed since the checkpoint?"
            )
        self.epoch, self.position = epoch, position
