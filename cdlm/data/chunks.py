"""A plain-text corpus cut into chunks of whole paragraphs, which parallel workers read in place.

The row cache (:func:`cdlm.data.pack.prepare`) tokenises a source of ``.txt`` files
(:func:`~cdlm.data.sources.plain_text_files`) without first copying it into an Arrow table. The main process
scans the files once, line by line and keeping nothing, and cuts them after blank lines into chunks of
``docs_per_chunk`` paragraphs; a chunk is a list of byte ranges, since one may span files. A worker reads its
chunk's ranges with ordinary reads and packs them. No process maps the corpus into memory or holds more of it
than one chunk, so memory stays flat whatever the corpus size. Paragraphs are split as
:func:`~cdlm.data.sources.paragraphs` splits them everywhere, and the chunks are the groups of documents in
which the stream (:mod:`cdlm.data.stream`) packs the same files, so both give the same rows.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from cdlm.data.sources import paragraphs

Part = tuple[str, int, int]
"""A byte range of one file: (path, first byte, end byte)."""


def plan_chunks(files: Sequence[Path], docs_per_chunk: int) -> tuple[list[list[Part]], int]:
    """Cut ``files`` (read in order, as one corpus) into chunks of ``docs_per_chunk`` paragraphs each.

    Args:
        files: the ``.txt`` files of the source.
        docs_per_chunk: paragraphs per chunk; the last chunk may hold fewer.

    Returns:
        The chunks, each a list of byte ranges to read in order, and the number of paragraphs in all.
    """
    chunks: list[list[Part]] = []
    parts: list[Part] = []
    docs = total = 0
    for path in files:
        start = pos = 0
        in_paragraph = False
        with open(path, "rb") as f:
            for line in f:
                pos += len(line)
                blank = not line.strip(b" \t\r\f\v\n")
                ended = in_paragraph and blank  # this blank line ends a paragraph
                in_paragraph = not blank
                if not ended:
                    continue
                docs, total = docs + 1, total + 1
                if docs == docs_per_chunk:  # cut after this blank line
                    chunks.append([*parts, (str(path), start, pos)])
                    parts, docs, start = [], 0, pos
        if in_paragraph:  # the file's last paragraph, without a blank line after it
            docs, total = docs + 1, total + 1
        if pos > start:
            parts.append((str(path), start, pos))
        if docs == docs_per_chunk:
            chunks.append(parts)
            parts, docs = [], 0
    if docs:
        chunks.append(parts)
    return chunks, total


def read_chunk(parts: Sequence[Part]) -> list[str]:
    """Return the paragraphs of a chunk's byte ranges, in order.

    Raises:
        DataError: a paragraph is not UTF-8.
    """
    texts: list[str] = []
    for name, start, end in parts:
        with open(name, "rb") as f:
            f.seek(start)
            texts += paragraphs(io.BytesIO(f.read(end - start)), name)  # one chunk's bytes at a time
    return texts
