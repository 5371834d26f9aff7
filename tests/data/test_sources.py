from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pytest
from datasets import Dataset, DatasetDict

from cdlm.config import DataConfig
from cdlm.data.sources import load_texts
from cdlm.errors import DataError
from conftest import shared_path

TEXT = "First paragraph,\nwrapped.\n\n\nSecond one.\n  \nThird\n"
PARAGRAPHS = ["First paragraph,\nwrapped.", "Second one.", "Third"]
RECORDS = [{"text": "alpha beta", "src": "a", "n": 1}, {"text": "gamma", "src": "b", "n": 2}]


def texts(cfg: DataConfig) -> list[str]:
    return list(load_texts(cfg)["text"])


def test_pydoc_builtin_is_prose_paragraphs() -> None:
    from pydoc_data.topics import topics

    ds = load_texts(DataConfig())
    assert ds.column_names == ["text"]
    rows = list(ds["text"])
    assert len(rows) > 1000 and sum(map(len, rows)) > 250_000
    first = " ".join(topics[sorted(topics)[0]].split())
    assert all(len(t) >= 60 and "  " not in t and "\n" not in t for t in rows)
    assert rows[0] in first  # paragraphs of the first topic come first, whitespace collapsed
    assert not any(t.startswith(">>>") for t in rows)  # interactive code listings are left out
    assert len(load_texts(DataConfig(max_rows=3))) == 3


def test_pydoc_seq2seq_columns() -> None:
    ds = load_texts(DataConfig(source_field="topic", max_rows=2))
    assert ds.column_names == ["text", "source"]
    first_topic = sorted(__import__("pydoc_data.topics").topics.topics)[0]
    assert list(ds["source"]) == [first_topic, first_topic]


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_txt_paragraphs(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"doc{suffix}"
    if suffix.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(TEXT)
    else:
        path.write_text(TEXT, encoding="utf-8")
    assert texts(DataConfig(source=str(path))) == PARAGRAPHS


def write_table(path: Path) -> None:
    ds = Dataset.from_list(RECORDS)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(RECORDS), encoding="utf-8")
    elif path.suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        table = ds.data.table
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".arrow"])
def test_table_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    write_table(path)
    ds = load_texts(DataConfig(source=str(path), source_field="src"))
    assert ds.column_names == ["text", "source"]
    assert list(ds["text"]) == ["alpha beta", "gamma"] and list(ds["source"]) == ["a", "b"]


def test_swapped_fields(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    write_table(path)
    ds = load_texts(DataConfig(source=str(path), text_field="src", source_field="text"))
    assert list(ds["text"]) == ["a", "b"] and list(ds["source"]) == ["alpha beta", "gamma"]


def test_directory_with_holdout(tmp_path: Path) -> None:
    for name, body in [("b.txt", "two\n\nthree"), ("a.txt", "one"), ("c.txt", "held out"), ("README.md", "x")]:
        (tmp_path / name).write_text(body, encoding="utf-8")
    assert texts(DataConfig(source=str(tmp_path), holdout=["c.txt"])) == ["one", "two", "three"]
    with pytest.raises(DataError, match=r"data.holdout: \['d.txt'\] not found .*'a.txt'"):
        load_texts(DataConfig(source=str(tmp_path), holdout=["d.txt"]))


def test_directory_mixed_columns_fail(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    write_table(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="b.jsonl: columns .* differ from"):
        load_texts(DataConfig(source=str(tmp_path)))


def test_save_to_disk_dataset_and_splits(tmp_path: Path) -> None:
    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "one"))
    assert texts(DataConfig(source=str(tmp_path / "one"))) == ["alpha beta", "gamma"]
    both = DatasetDict(train=Dataset.from_list(RECORDS[:1]), validation=Dataset.from_list(RECORDS[1:]))
    both.save_to_disk(str(tmp_path / "dict"))
    assert texts(DataConfig(source=str(tmp_path / "dict"), split="validation")) == ["gamma"]
    with pytest.raises(DataError, match=r"data.split 'test' not in .*\['train', 'validation'\]"):
        load_texts(DataConfig(source=str(tmp_path / "dict"), split="test"))


def test_austen_directory_holds_out_persuasion() -> None:
    root = shared_path("data", "austen")
    ds = load_texts(DataConfig(source=str(root), holdout=["persuasion.txt.gz"]))
    assert len(ds) > 5000
    assert not any("Anne Elliot" in t for t in ds["text"])
    held = load_texts(DataConfig(source=str(root / "persuasion.txt.gz"), max_rows=400))
    assert any("Anne" in t for t in held["text"])


def test_errors_name_what_and_where(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.jsonl'?: no such file"):
        load_texts(DataConfig(source=str(tmp_path / "missing.jsonl")))
    write_table(tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"data.text_field 'body': no such column .*\['text', 'src', 'n'\]"):
        load_texts(DataConfig(source=str(tmp_path / "d.jsonl"), text_field="body"))
    with pytest.raises(DataError, match="data.source_field 'n'.*expected a text column"):
        load_texts(DataConfig(source=str(tmp_path / "d.jsonl"), source_field="n"))
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_texts(DataConfig(source=str(tmp_path / "empty.txt")))
    with pytest.raises(DataError, match="unknown builtin"):
        load_texts(DataConfig(source="builtin:nope"))
    with pytest.raises(DataError, match="data.holdout"):
        load_texts(DataConfig(holdout=["x.txt"]))
    with pytest.raises(DataError, match="hub dataset could not be loaded"):
        load_texts(DataConfig(source="no-such-owner/no-such-dataset"))
