"""Packing token ids into fixed-length rows, and the whole text → rows pipeline.

Two row layouts, both returned as one :class:`~cdlm.interfaces.TokenBatch` holding every row:

* **Language modelling** (no ``data.source_field``): documents are concatenated, each followed by EOS, and
  cut into rows of ``seq_len``; only the last row can be short, and is filled.
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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from cdlm.config import DataConfig
from cdlm.data.sources import load_texts
from cdlm.data.tokenize import TOKENIZER_FILE, SpecialIds, encode, load_tokenizer, special_ids
from cdlm.errors import DataError
from cdlm.interfaces import TokenBatch


@dataclass(frozen=True)
class PackedData:
    """A corpus ready to batch.

    Attributes:
        rows: every row of the corpus, ids (R, L) int64, mask and cond_mask (R, L) bool.
        tokenizer: the tokenizer that made ``rows`` (decodes samples).
        special: its pad and EOS ids.
    """

    rows: TokenBatch
    tokenizer: PreTrainedTokenizerBase
    special: SpecialIds


def prepare(cfg: DataConfig, cache_dir: Path, on_phase: Callable[[str], None] | None = None) -> PackedData:
    """Load, tokenise and pack the corpus of ``cfg``: the data pipeline in one call.

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
    say(f"data: reading {cfg.source}")
    texts = load_texts(cfg)
    corpus = chain(texts["source"], texts["text"]) if cfg.source_field is not None else texts["text"]
    trains = cfg.tokenizer == "bpe" and not (Path(cache_dir) / TOKENIZER_FILE).is_file()
    say(
        f"data: training a {cfg.vocab_size}-token BPE on {len(texts)} documents"
        if trains
        else "data: loading the tokenizer"
    )
    tok = load_tokenizer(cfg, cache_dir, corpus)
    special = special_ids(tok)
    say(f"data: tokenizing and packing {len(texts)} documents into rows of {cfg.seq_len} tokens")
    if cfg.source_field is None:
        rows = pack_documents(encode(tok, texts["text"]), cfg.seq_len, special, cfg.pad_token)
    else:
        rows = seq2seq_rows(
            encode(tok, texts["source"]),
            encode(tok, texts["text"]),
            cfg.seq_len,
            cfg.max_source_len,
            special,
            cfg.pad_token,
        )
    say(f"data: {rows.ids.shape[0]} rows of {cfg.seq_len} tokens")
    return PackedData(rows=rows, tokenizer=tok, special=special)


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
