"""Streaming rows (``data.streaming: true``): a source read and tokenised on the fly, resumable exactly.

Documents are read in the source's order (no shuffling), tokenised ``PACK_GROUP`` at a time and packed as the
cached pipeline packs them (:func:`cdlm.data.pack.pack_batch`, whose last row per chunk is filled). Every
process reads the whole stream and keeps its share of each global batch: with P processes and batch size B,
global batch k is the next P·B rows and process r takes rows [r·B, (r+1)·B) of it, so all processes stay in
lockstep. An incomplete last global batch is dropped and the next epoch starts the stream again.

The position is ``{epoch, position, doc, offset}``: batches yielded this epoch, and where the next global
batch starts, as a document index and a row offset into that document's chunk. A resumed run skips ``doc``
records (read, not tokenised) and continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from datasets import IterableDataset

from cdlm.errors import DataError
from cdlm.interfaces import TokenBatch

PACK_GROUP = 10_000  # documents tokenised and packed together, here and in the cached pipeline's map batches


class RowStream:
    """Packed rows of a streamed source, readable from any chunk boundary and row offset.

    Args:
        source: the records (``text`` and maybe ``source``, or ``input_ids``) in order.
        pack: packs one chunk of records (columns → lists) into rows (:func:`cdlm.data.pack.pack_batch`).
        name: the source, for messages.
    """

    def __init__(self, source: IterableDataset, pack: Callable[[dict[str, list]], TokenBatch], name: str) -> None:
        self.source, self.pack, self.name = source, pack, name

    def rows(self, doc: int, offset: int) -> Iterator[tuple[TokenBatch, int, int]]:
        """Yield ``(row (1, L), doc, offset)`` from the chunk starting at document ``doc``, skipping ``offset`` rows.

        ``doc`` and ``offset`` of each yielded item say where the row *after* it starts.
        """
        records = self.source.skip(doc) if doc else self.source
        for chunk in records.iter(batch_size=PACK_GROUP):
            size = len(next(iter(chunk.values())))
            packed = self.pack(chunk)
            count = packed.ids.shape[0]
            for i in range(offset, count):
                at = (doc, i + 1) if i + 1 < count else (doc + size, 0)
                yield TokenBatch(packed.ids[i : i + 1], packed.mask[i : i + 1], packed.cond_mask[i : i + 1]), *at
            doc, offset = doc + size, 0


class StreamReader:
    """Batches of a :class:`RowStream` for one process, with a saveable position (see the module docstring).

    Args:
        stream: the rows.
        batch_size: rows per batch on this process.
        process_index: this process's rank r.
        num_processes: the world size P.
    """

    def __init__(self, stream: RowStream, batch_size: int, process_index: int, num_processes: int) -> None:
        self.stream, self.batch_size = stream, batch_size
        self.process_index, self.num_processes = process_index, num_processes
        self.epoch, self.position, self.doc, self.offset = 0, 0, 0, 0
        self._rows: Iterator[tuple[TokenBatch, int, int]] | None = None

    def __next__(self) -> TokenBatch:
        want = self.batch_size * self.num_processes
        for attempt in range(2):
            if self._rows is None:
                self._rows = self.stream.rows(self.doc, self.offset)
            got = [item for _, item in zip(range(want), self._rows, strict=False)]
            if len(got) == want:
                mine = got[self.process_index * self.batch_size : (self.process_index + 1) * self.batch_size]
                self.position, self.doc, self.offset = self.position + 1, got[-1][1], got[-1][2]
                return TokenBatch(
                    *(torch.cat([getattr(r, f) for r, _, _ in mine]) for f in ("ids", "mask", "cond_mask"))
                )
            if attempt == 0 and self.position > 0:  # the epoch ended: drop the incomplete batch, start again
                self.epoch, self.position, self.doc, self.offset, self._rows = self.epoch + 1, 0, 0, 0, None
        raise DataError(
            f"data.source {self.stream.name!r}: the stream holds fewer than {want} rows, too few for one "
            f"batch of train.batch_size={self.batch_size} on each of {self.num_processes} process(es)"
        )

    def state_dict(self) -> dict[str, int]:
        """Return ``{"epoch", "position", "doc", "offset"}``."""
        return {"epoch": self.epoch, "position": self.position, "doc": self.doc, "offset": self.offset}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Raises:
            DataError: the state was not saved by a streaming loader.
        """
        if not {"doc", "offset"} <= set(state):
            raise DataError(
                f"loader state {dict(state)} was not saved with data.streaming: true; resume with the data settings "
                "the run was trained with"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.doc, self.offset, self._rows = int(state["doc"]), int(state["offset"]), None
