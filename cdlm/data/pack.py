"""Packing token ids into fixed-length rows, and the whole text → rows pipeline.

Two row layouts, both built as a :class:`~cdlm.interfaces.TokenBatch` of rows:

* **Language modelling** (no ``data.source_field``): documents are concatenated, each followed by EOS, and
  cut into rows of ``seq_len``; only the last row can be short, and is filled. :func:`prepare` packs
  10,000 documents at a time (a ``datasets`` map step), so the last row of each such group is filled. A
  plain-text source is read in place, a chunk of 10,000 paragraphs per map input (:mod:`cdlm.data.chunks`),
  so preparing it holds one chunk per process whatever the corpus size; other sources are read from their
  Arrow table.
* **Seq2seq** (ELF spec §5): per example ``cond = source[:max_source_len]``, ``seq = cat(cond, target)``,
  truncated to ``seq_len`` and filled. Nothing is appended to the target; with ``pad_token: eos`` the EOS fill
  is what marks its end.

Fill and masks: the fill id is the pad id (``data.pad_token: pad``) or EOS (``pad_token: eos``).
``mask`` is True on real tokens only (documents, their EOS separators, condition and target) and False on
fill, whatever its id: it is the validity mask the encoder attends with (ELF spec §2 ``is_valid``).
Whether fill positions are trained is the objective's call: under ``pad_token: eos`` they are exactly the
positions with ``mask == False`` and ``ids == eos`` (ELF spec §3.3 step 2 trains them).
``cond_mask`` is True on the condition prefix (seq2seq) and all False for language modelling.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase

from cdlm.config import DataConfig
from cdlm.data.cache import TokenRows, cached_rows, resolve_num_proc, row_features, token_dtype
from cdlm.data.chunks import plan_chunks, read_chunk
from cdlm.data.sources import (
    TOKEN_COLUMN,
    empty_source,
    is_tokenized,
    load_texts,
    paragraphs,
    plain_text_files,
    stream_source,
)
from cdlm.data.stream import PACK_GROUP, RowStream
from cdlm.data.tokenize import TOKENIZER_FILE, SpecialIds, encode, load_tokenizer, special_ids
from cdlm.errors import DataError
from cdlm.interfaces import TokenBatch

# Rows per Arrow record batch: opening a table touches every batch's header page (and the kernel maps the pages
# around it), so few large batches keep a memory-mapped cache from adding to the RSS of every process.
_WRITER_ROWS = 1 << 16


@dataclass(frozen=True)
class PackedData:
    """A corpus ready to batch.

    Attributes:
        rows: the packed rows: memory-mapped from the row cache (:class:`~cdlm.data.cache.TokenRows`), or read
            on the fly with ``data.streaming`` (:class:`~cdlm.data.stream.RowStream`); batched by
            :class:`~cdlm.data.loader.ResumableLoader`.
        tokenizer: the tokenizer that made ``rows`` (decodes samples).
        special: its pad and EOS ids.
    """

    rows: TokenRows | RowStream
    tokenizer: PreTrainedTokenizerBase
    special: SpecialIds


def prepare(cfg: DataConfig, cache_dir: Path, on_phase: Callable[[str], None] | None = None) -> PackedData:
    """Load, tokenise and pack the corpus of ``cfg``: the data pipeline in one call.

    Without ``data.streaming`` the rows come from the on-disk row cache (:mod:`cdlm.data.cache`), built on a
    first use; a cached corpus is opened without reading its source (unless a BPE must first be trained).

    Args:
        cfg: the run's data section.
        cache_dir: where a trained BPE tokenizer is cached (the run directory).
        on_phase: called with a one-line description as each phase starts (progress at start-up).

    Returns:
        The packed rows, with their tokenizer and special ids.

    Raises:
        DataError: from any stage (missing source, bad column, empty corpus, tokenizer mismatch, bad lengths).
    """
    say = on_phase or (lambda message: None)
    if cfg.streaming:
        say(f"data: streaming {cfg.source}")
        stream = stream_source(cfg)
        tok = _tokenizer(cfg, cache_dir, stream, say)
        special = special_ids(tok)
        pack = partial(pack_batch, tok=tok, cfg=cfg, special=special)
        return PackedData(rows=RowStream(stream, pack, cfg.source), tokenizer=tok, special=special)
    files = plain_text_files(cfg)  # read in place, chunk by chunk (cdlm.data.chunks); else through Arrow
    texts: Dataset | Iterator[str] | None = None
    if cfg.tokenizer == "bpe" and not (Path(cache_dir) / TOKENIZER_FILE).is_file():
        say(f"data: reading {cfg.source}")
        texts = load_texts(cfg) if files is None else _file_texts(cfg, files)
    tok = _tokenizer(cfg, cache_dir, texts, say)
    special = special_ids(tok)

    def build(out: Path) -> None:
        if files is not None:  # one map input per chunk of PACK_GROUP paragraphs, read by the worker it goes to
            chunks, count = plan_chunks(files, PACK_GROUP)
            if not count:
                raise empty_source(cfg)
            source = Dataset.from_dict({"parts": [json.dumps(chunk) for chunk in chunks]})
            pack, batch_size = _read_and_pack, 1
        else:
            source = texts if isinstance(texts, Dataset) else load_texts(cfg)
            count, pack, batch_size = len(source), _tokenize_and_pack, PACK_GROUP
        num_proc = resolve_num_proc(cfg, count)
        say(
            f"data: tokenizing and packing {count} documents into rows of {cfg.seq_len} tokens ({num_proc} process(es))"
        )
        source.map(
            pack,
            batched=True,
            batch_size=batch_size,
            writer_batch_size=_WRITER_ROWS,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=source.column_names,
            features=row_features(cfg.seq_len, token_dtype(len(tok))),
            fn_kwargs={"tok": tok, "cfg": cfg, "special": special},
            cache_file_name=str(out / "rows.arrow"),
            new_fingerprint=out.name,
            desc="tokenizing and packing",
        )

    rows = cached_rows(cfg, tok, build, say)
    say(f"data: {len(rows)} rows of {cfg.seq_len} tokens")
    return PackedData(rows=rows, tokenizer=tok, special=special)


def _file_texts(cfg: DataConfig, files: list[Path]) -> Iterator[str]:
    """The paragraphs of plain-text files, in order, read as they are needed.

    Raises:
        DataError: the files hold no paragraph (when it is first read).
    """
    found = False
    for path in files:
        with open(path, "rb") as f:
            for text in paragraphs(f, str(path)):
                found = True
                yield text
    if not found:
        raise empty_source(cfg)


def _tokenizer(
    cfg: DataConfig,
    cache_dir: Path,
    texts: Dataset | IterableDataset | Iterator[str] | None,
    say: Callable[[str], None],
) -> PreTrainedTokenizerBase:
    """Load the run's tokenizer, training the BPE on ``texts`` when it is not cached yet."""
    columns = getattr(texts, "column_names", None) or []
    if is_tokenized(list(columns)) and cfg.tokenizer == "bpe":
        raise DataError(
            f"data.source {cfg.source!r} is already tokenised ({TOKEN_COLUMN!r} column): set data.tokenizer to "
            "the tokenizer that made it (a hub id or a save_pretrained directory), not 'bpe'"
        )
    trains = cfg.tokenizer == "bpe" and not (Path(cache_dir) / TOKENIZER_FILE).is_file()
    say(f"data: training a {cfg.vocab_size}-token BPE on {cfg.source}" if trains else "data: loading the tokenizer")
    corpus = _corpus(texts, cfg) if isinstance(texts, (Dataset, IterableDataset)) else iter(texts or ())
    return load_tokenizer(cfg, cache_dir, corpus)


def _corpus(texts: Dataset | IterableDataset, cfg: DataConfig) -> Iterator[str]:
    """Every text a BPE trains on: conditions, then targets (seq2seq), or the documents."""
    columns = ["source", "text"] if cfg.source_field is not None else ["text"]
    for column in columns:
        for batch in texts.select_columns([column]).iter(batch_size=PACK_GROUP):
            yield from batch[column]


def _read_and_pack(
    batch: dict[str, list], tok: PreTrainedTokenizerBase, cfg: DataConfig, special: SpecialIds
) -> dict[str, np.ndarray]:
    """Map step: one chunk of a plain-text source (byte ranges, as JSON) → packed rows, as in the other map step."""
    (parts,) = batch["parts"]
    return _tokenize_and_pack({"text": read_chunk(json.loads(parts))}, tok, cfg, special)


def _tokenize_and_pack(
    batch: dict[str, list], tok: PreTrainedTokenizerBase, cfg: DataConfig, special: SpecialIds
) -> dict[str, np.ndarray]:
    """Map step: one batch of documents (or examples) → packed rows as ``ids``, ``length``, ``cond_len``."""
    rows = pack_batch(batch, tok, cfg, special)
    return {
        "ids": rows.ids.numpy().astype(token_dtype(len(tok))),
        "length": rows.mask.sum(dim=1).numpy().astype(np.int32),
        "cond_len": rows.cond_mask.sum(dim=1).numpy().astype(np.int32),
    }


def pack_batch(
    batch: dict[str, list], tok: PreTrainedTokenizerBase, cfg: DataConfig, special: SpecialIds
) -> TokenBatch:
    """Pack one batch of source records into rows; a batch's last language-modelling row is filled.

    Records hold ``text`` (and ``source``) strings, or ``input_ids``: a batch of id lists all ``seq_len`` long
    is taken as rows as they are; otherwise each id list is a document.

    Raises:
        DataError: a token id lies outside the tokenizer's vocabulary, or no tokens at all.
    """
    if TOKEN_COLUMN in batch:
        docs = batch[TOKEN_COLUMN]
        top = max((max(d) for d in docs if len(d)), default=0)
        if top >= len(tok):
            raise DataError(
                f"data.source {cfg.source!r}: token id {top} in column {TOKEN_COLUMN!r} is outside the vocabulary "
                f"of data.tokenizer {cfg.tokenizer!r} ({len(tok)} tokens); set the tokenizer that made the ids"
            )
        if all(len(d) == cfg.seq_len for d in docs):
            ids = torch.tensor(np.asarray(docs, dtype=np.int64))  # (R, L)
            return TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool))
        return pack_documents(docs, cfg.seq_len, special, cfg.pad_token)
    if cfg.source_field is None:
        return pack_documents(encode(tok, batch["text"]), cfg.seq_len, special, cfg.pad_token)
    return seq2seq_rows(
        encode(tok, batch["source"]),
        encode(tok, batch["text"]),
        cfg.seq_len,
        cfg.max_source_len,
        special,
        cfg.pad_token,
    )


def _fill_id(special: SpecialIds, pad_token: Literal["pad", "eos"]) -> int:
    return special.eos if pad_token == "eos" else special.pad


def pack_documents(
    docs: Iterable[Sequence[int]], seq_len: int, special: SpecialIds, pad_token: Literal["pad", "eos"]
) -> TokenBatch:
    """Concatenate documents, each followed by EOS, and cut the stream into rows of ``seq_len``.

    Args:
        docs: token ids per document, without special tokens; empty documents are skipped.
        seq_len: L, tokens per row.
        special: pad and EOS ids.
        pad_token: what fills the tail of the last row ("pad" → pad id, "eos" → EOS id).

    Returns:
        ids (R, L) int64 with R = ceil(tokens / L); mask (R, L) False only on the fill; cond_mask all False.

    Raises:
        DataError: there are no tokens at all.
    """
    parts = [np.append(np.asarray(d, dtype=np.int64), special.eos) for d in docs if len(d) > 0]
    if not parts:
        raise DataError("the corpus tokenises to no tokens at all; nothing to pack")
    stream = np.concatenate(parts)  # (T,)
    rows = -(-stream.size // seq_len)
    ids = np.full(rows * seq_len, _fill_id(special, pad_token), dtype=np.int64)
    ids[: stream.size] = stream
    mask = np.arange(rows * seq_len) < stream.size
    return TokenBatch(
        ids=torch.from_numpy(ids.reshape(rows, seq_len)),  # (R, L)
        mask=torch.from_numpy(mask.reshape(rows, seq_len)),  # (R, L)
        cond_mask=torch.zeros(rows, seq_len, dtype=torch.bool),
    )


def seq2seq_rows(
    sources: Iterable[Sequence[int]],
    targets: Iterable[Sequence[int]],
    seq_len: int,
    max_source_len: int,
    special: SpecialIds,
    pad_token: Literal["pad", "eos"],
) -> TokenBatch:
    """Build one row per (source, target) pair: ``cat(source[:max_source_len], target)`` cut/filled to L.

    Args:
        sources: condition token ids per example.
        targets: target token ids per example (same count as ``sources``).
        seq_len: L, tokens per row.
        max_source_len: condition tokens kept per row; 1 ≤ max_source_len < L.
        special: pad and EOS ids.
        pad_token: what fills each row after its target ("pad" → pad id, "eos" → EOS id).

    Returns:
        ids (R, L) int64; mask (R, L) True on condition and target tokens; cond_mask (R, L) True on the condition.

    Raises:
        DataError: ``max_source_len`` leaves no room for a target, or there are no examples.
    """
    if not 1 <= max_source_len < seq_len:
        raise DataError(
            f"data.max_source_len {max_source_len}: seq2seq needs 1 <= max_source_len < data.seq_len ({seq_len})"
        )
    fill = _fill_id(special, pad_token)
    ids_rows, lengths, cond_lengths = [], [], []
    for src, tgt in zip(sources, targets, strict=True):
        cond = list(src[:max_source_len])
        seq = (cond + list(tgt))[:seq_len]
        ids_rows.append(seq + [fill] * (seq_len - len(seq)))
        lengths.append(len(seq))
        cond_lengths.append(len(cond))
    if not ids_rows:
        raise DataError("the seq2seq corpus has no examples; nothing to pack")
    pos = torch.arange(seq_len)  # (L,)
    return TokenBatch(
        ids=torch.tensor(ids_rows, dtype=torch.int64),  # (R, L)
        mask=pos < torch.tensor(lengths)[:, None],  # (R, L)
        cond_mask=pos < torch.tensor(cond_lengths)[:, None],  # (R, L)
    )
