from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cdlm.config import DataConfig
from cdlm.data.cache import TokenRows
from cdlm.data.pack import PackedData, pack_documents, prepare, seq2seq_rows
from cdlm.data.sources import load_texts
from cdlm.data.tokenize import SpecialIds
from cdlm.errors import DataError
from cdlm.interfaces import TokenBatch

SPECIAL = SpecialIds(pad=0, eos=1)
DOCS = [[5, 6], [], [7], [8, 9, 10]]


@pytest.mark.parametrize(("pad_token", "fill"), [("pad", 0), ("eos", 1)])
def test_pack_documents_exact(pad_token: str, fill: int) -> None:
    rows = pack_documents(DOCS, 4, SPECIAL, pad_token)
    # stream: 5 6 EOS 7 EOS 8 9 10 EOS (the empty document adds nothing)
    assert rows.ids.tolist() == [[5, 6, 1, 7], [1, 8, 9, 10], [1, fill, fill, fill]]
    assert rows.mask.tolist() == [[True] * 4, [True] * 4, [True, False, False, False]]
    assert rows.ids.dtype == torch.int64 and rows.mask.dtype == torch.bool
    assert not rows.cond_mask.any()


def test_pack_exact_multiple_has_no_fill() -> None:
    rows = pack_documents([[5, 6, 7]], 2, SPECIAL, "pad")
    assert rows.ids.tolist() == [[5, 6], [7, 1]] and bool(rows.mask.all())


def test_pack_nothing_is_an_error() -> None:
    with pytest.raises(DataError, match="no tokens"):
        pack_documents([[], []], 4, SPECIAL, "pad")


@pytest.mark.parametrize(("pad_token", "fill"), [("pad", 0), ("eos", 1)])
def test_seq2seq_rows_exact(pad_token: str, fill: int) -> None:
    sources = [[20, 21, 22, 23], [30], [40, 41, 42]]
    targets = [[50, 51], [60, 61, 62, 63, 64, 65, 66], []]
    rows = seq2seq_rows(sources, targets, 6, 3, SPECIAL, pad_token)
    f = fill
    assert rows.ids.tolist() == [
        [20, 21, 22, 50, 51, f],  # source cut to max_source_len = 3
        [30, 60, 61, 62, 63, 64],  # cond + target cut to seq_len
        [40, 41, 42, f, f, f],
    ]
    assert rows.mask.int().tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 0, 0, 0]]
    assert rows.cond_mask.int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]


@pytest.mark.parametrize("max_source_len", [0, 6])
def test_seq2seq_needs_room_for_a_target(max_source_len: int) -> None:
    with pytest.raises(DataError, match=f"data.max_source_len {max_source_len}"):
        seq2seq_rows([[1]], [[2]], 6, max_source_len, SPECIAL, "pad")


def every_row(data: PackedData) -> TokenBatch:
    assert isinstance(data.rows, TokenRows)
    return data.rows.take(np.arange(len(data.rows)))


def test_prepare_language_modelling(tmp_path: Path) -> None:
    cfg = DataConfig(max_rows=3, vocab_size=300, seq_len=32, cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and data.special == SPECIAL
    ids, mask = every_row(data).ids, every_row(data).mask
    assert ids.shape[1] == 32 and not bool(mask[:-1].logical_not().any())  # only the last row is filled
    assert int((ids[mask] == 1).sum()) == 3  # one EOS after each document
    assert load_texts(cfg)["text"][0].startswith(data.tokenizer.decode(ids[0].tolist()))


def test_prepare_seq2seq(tmp_path: Path) -> None:
    cfg = DataConfig(max_rows=4, vocab_size=300, seq_len=24, source_field="topic", max_source_len=8, pad_token="eos")
    rows = every_row(prepare(cfg.model_copy(update={"cache_dir": str(tmp_path / "cache")}), tmp_path))
    assert rows.ids.shape == (4, 24)
    cond_len = rows.cond_mask.sum(1)
    assert bool((cond_len >= 1).all()) and bool((cond_len <= 8).all())
    topic = prepare(cfg, tmp_path).tokenizer.decode(rows.ids[0, : int(cond_len[0])].tolist())
    assert topic == "assert"[: len(topic)]
