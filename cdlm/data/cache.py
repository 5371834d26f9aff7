"""The on-disk row cache: a corpus tokenised and packed once, in parallel, then memory-mapped by every run.

A cache entry is a directory of Arrow files under ``data.cache_dir`` named by a hash of what
decides its content: the source (file names, sizes and times, or the hub id, and the columns read), the
tokenizer (its serialised form), ``seq_len`` and the packing mode (``source_field``, ``max_source_len``,
``pad_token``). It holds one record per row:

* ``ids``: the row's L token ids in the smallest dtype that holds the vocabulary (uint16 up to 65,536 tokens,
  else int32), converted to int64 one batch at a time (:class:`TokenRows`);
* ``length``: how many leading positions hold real tokens (``mask``), the rest being fill;
* ``cond_len``: how many leading positions are the seq2seq condition (``cond_mask``; 0 for language modelling).

The entry is built by one ``datasets`` map step (tokenise and pack, batched, ``num_proc`` processes, one
``rows*.arrow`` file each) under Accelerate's ``local_main_process_first`` (once per node), written to a
temporary directory and renamed into place, so a crashed build is never read and a second launch (or the other
processes of this one) only memory-maps it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import Dataset, Features, Value
from transformers import PreTrainedTokenizerBase

from cdlm.config import DataConfig
from cdlm.data.sources import source_fingerprint
from cdlm.errors import DataError
from cdlm.interfaces import TokenBatch
from cdlm.training.distributed import process_state

CACHE_SUBDIR = "cdlm-rows"
_AUTO_PARALLEL_ROWS = 50_000  # sources this large are tokenised by several processes when num_proc is unset
_MAX_AUTO_PROC = 8
_FORMAT = 2  # bumped when the entry layout changes, so that old entries are never read


class TokenRows:
    """Packed rows in a memory-mapped Arrow table; batches come out as int64 :class:`TokenBatch` es.

    Args:
        table: a dataset with the columns ``ids`` (fixed-length lists), ``length`` and ``cond_len``.
    """

    def __init__(self, table: Dataset) -> None:
        self.table = table.with_format("numpy")
        self.seq_len = int(table.features["ids"].length)

    def __len__(self) -> int:
        return len(self.table)

    def take(self, idx: np.ndarray) -> TokenBatch:
        """Return rows ``idx`` (B,) in that order: ids (B, L) int64, mask and cond_mask (B, L) bool."""
        got = self.table[idx]
        pos = torch.arange(self.seq_len)  # (L,)
        return TokenBatch(
            ids=torch.from_numpy(np.asarray(got["ids"], dtype=np.int64)),  # (B, L)
            mask=pos < torch.from_numpy(got["length"].astype(np.int64))[:, None],  # (B, L)
            cond_mask=pos < torch.from_numpy(got["cond_len"].astype(np.int64))[:, None],  # (B, L)
        )


def token_dtype(vocab_size: int) -> str:
    """The smallest dtype that holds every id below ``vocab_size``: "uint16" up to 65,536 tokens, else "int32"."""
    return "uint16" if vocab_size <= 2**16 else "int32"


def row_features(seq_len: int, dtype: str) -> Features:
    """The Arrow schema of cached rows."""
    return Features(
        {
            "ids": datasets.Sequence(Value(dtype), length=seq_len),
            "length": Value("int32"),
            "cond_len": Value("int32"),
        }
    )


def cache_root(cfg: DataConfig) -> Path:
    """Where cache entries live: ``data.cache_dir``, else ``cdlm-rows`` under the datasets cache."""
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    return Path(datasets.config.HF_DATASETS_CACHE) / CACHE_SUBDIR


def cache_key(cfg: DataConfig, tok: PreTrainedTokenizerBase) -> str:
    """Name the cache entry of ``cfg`` tokenised by ``tok`` without reading the source."""
    backend = getattr(tok, "backend_tokenizer", None)
    tok_id = backend.to_str() if backend is not None else f"{tok.name_or_path}:{len(tok)}"
    parts = {
        "format": _FORMAT,
        "source": [cfg.source, cfg.subset, cfg.split, source_fingerprint(cfg)],
        "tokenizer": hashlib.sha256(tok_id.encode()).hexdigest(),
        "seq_len": cfg.seq_len,
        "packing": [cfg.source_field, cfg.max_source_len, cfg.pad_token],
    }
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def resolve_num_proc(cfg: DataConfig, num_rows: int) -> int:
    """``data.num_proc``, or by default up to 8 processes (one per core) for 50,000 rows or more, else 1."""
    if cfg.num_proc is not None:
        return cfg.num_proc
    return min(_MAX_AUTO_PROC, os.cpu_count() or 1) if num_rows >= _AUTO_PARALLEL_ROWS else 1


def cached_rows(
    cfg: DataConfig,
    tok: PreTrainedTokenizerBase,
    build: Callable[[Path], None],
    say: Callable[[str], None],
) -> TokenRows:
    """Return the cached rows of ``cfg`` tokenised by ``tok``, building them first if no process has yet.

    Args:
        cfg: the data section (``cache_dir`` and what keys the entry).
        tok: the tokenizer the rows are made with.
        build: writes the entry's ``rows*.arrow`` files into the directory it is given; called on the main
            process only, while the others wait.
        say: progress callback.

    Raises:
        DataError: the cache directory cannot be written, or from ``build``.
    """
    entry = cache_root(cfg) / cache_key(cfg, tok)
    state = process_state()  # a gloo CPU worker under torchrun, not a lone process
    with state.local_main_process_first():  # one build per node; the cache may be node-local
        if state.is_local_main_process and not entry.is_dir():
            tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
            try:
                tmp.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise DataError(f"data.cache_dir {str(entry.parent)!r}: cannot create it ({err.strerror})") from None
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            build(tmp)
            try:
                os.replace(tmp, entry)
            except OSError:  # another node sharing the directory finished the same entry first
                shutil.rmtree(tmp, ignore_errors=True)
        elif entry.is_dir():
            say(f"data: reusing cached rows {entry}")
        files = sorted(entry.glob("rows*.arrow"))  # one per map process, in row order
        table = datasets.concatenate_datasets([Dataset.from_file(str(f)) for f in files])
    return TokenRows(table)
