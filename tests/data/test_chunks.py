"""Plain-text sources read in place: chunks of whole paragraphs give the documents and rows of the other paths."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from cdlm.config import DataConfig
from cdlm.data import pack, stream
from cdlm.data.cache import TokenRows
from cdlm.data.chunks import plan_chunks, read_chunk
from cdlm.data.pack import pack_batch, prepare
from cdlm.data.sources import load_texts, plain_text_files
from cdlm.data.stream import RowStream
from cdlm.data.tokenize import TOKENIZER_FILE, train_bpe
from cdlm.errors import DataError

# Line breaks of every kind, blank lines of whitespace, runs of them, a file that starts blank and one that ends
# without a blank line, a file of blank lines only, and text beyond ASCII.
FILES = {
    "a.txt": "\n\nFirst  paragraph,\nof two lines.\n \t\nSecond one.\r\nStill second.\r\n\r\n\n\nThird: café.\n",
    "b.txt": "   \n\n\t\n",
    "c.txt": "Fourth, right at the start.\n\nFifth.\n\n" + "".join(f"Para {i} here.\n\n" for i in range(6, 30)),
    "d.txt": "Last, no blank line after it",
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in FILES.items():
        (root / name).write_bytes(text.encode("utf-8"))
    return root


@pytest.mark.parametrize("per_chunk", [1, 2, 3, 7, 100])
def test_chunks_hold_whole_paragraphs_in_order(corpus: Path, per_chunk: int) -> None:
    files = plain_text_files(DataConfig(source=str(corpus)))
    assert files == sorted(corpus.iterdir())
    chunks, count = plan_chunks(files, per_chunk)
    read = [read_chunk(chunk) for chunk in chunks]
    expected = list(load_texts(DataConfig(source=str(corpus)))["text"])  # through an Arrow table
    assert count == len(expected) == 30 and [t for texts in read for t in texts] == expected
    assert [len(texts) for texts in read[:-1]] == [per_chunk] * (len(read) - 1) and 0 < len(read[-1]) <= per_chunk
    assert expected[:3] == ["First  paragraph,\nof two lines.", "Second one.\nStill second.", "Third: café."]


def test_only_plain_text_sources_are_read_in_place(corpus: Path, tmp_path: Path) -> None:
    assert plain_text_files(DataConfig(source=str(corpus), holdout=["b.txt"])) == [
        corpus / name for name in ("a.txt", "c.txt", "d.txt")
    ]
    for cfg in (
        DataConfig(source=str(corpus), max_rows=3),  # the first rows: through Arrow
        DataConfig(source=str(corpus), text_field="body"),  # an error there
        DataConfig(source="builtin:pydoc"),
    ):
        assert plain_text_files(cfg) is None
    with gzip.open(corpus / "e.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Compressed.\n")
    assert plain_text_files(DataConfig(source=str(corpus))) is None
    with pytest.raises(DataError, match="holdout"):
        plain_text_files(DataConfig(source=str(corpus), holdout=["missing.txt"]))


def test_cached_rows_of_text_read_in_place_equal_the_stream(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pack, "PACK_GROUP", 4)  # groups that span files, packed by two processes
    monkeypatch.setattr(stream, "PACK_GROUP", 4)
    cfg = DataConfig(source=str(corpus), vocab_size=300, seq_len=8, num_proc=2, cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, tmp_path)
    streamed = prepare(cfg.model_copy(update={"streaming": True}), tmp_path).rows
    assert isinstance(data.rows, TokenRows) and isinstance(streamed, RowStream)
    cached = data.rows.take(np.arange(len(data.rows)))
    texts = list(load_texts(cfg)["text"])
    groups = [pack_batch({"text": texts[i : i + 4]}, data.tokenizer, cfg, data.special) for i in range(0, 30, 4)]
    whole = pack_batch({"text": texts}, data.tokenizer, cfg, data.special)
    expected = torch.cat([g.ids for g in groups])
    assert expected.shape != whole.ids.shape or not torch.equal(expected, whole.ids)  # the grouping shows
    flat = [row for row, _, _ in streamed.rows(0, 0)]
    for ids, mask in ((cached.ids, cached.mask), (torch.cat([r.ids for r in flat]), torch.cat([r.mask for r in flat]))):
        assert torch.equal(ids, expected)
        assert torch.equal(mask, torch.cat([g.mask for g in groups]))


def test_an_empty_text_source_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    cfg = DataConfig(source=str(tmp_path / "empty.txt"), vocab_size=300, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="the dataset is empty"):  # found while training the BPE
        prepare(cfg, tmp_path / "run")
    (tmp_path / "run").mkdir()
    train_bpe([text for text in FILES.values() for _ in range(20)], 300).save(str(tmp_path / "run" / TOKENIZER_FILE))
    with pytest.raises(DataError, match="the dataset is empty"):  # found while cutting chunks
        prepare(cfg, tmp_path / "run")
