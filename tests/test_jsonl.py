from __future__ import annotations

from pathlib import Path

import pytest

from cdlm.errors import DataError
from cdlm.eval.inputs import read_jsonl
from cdlm.jsonl import read_records


def test_records_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert read_records(path, "--input") == [(1, {"a": 1}), (3, {"a": 2})]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert read_records(tmp_path / "empty.jsonl", "--input") == []
    with pytest.raises(DataError, match="--samples .*empty.jsonl: the file has no records"):
        read_jsonl(tmp_path / "empty.jsonl", "--samples")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"a": 1}\n\xe9\n', r"--input .*bad.jsonl: not UTF-8 text \(invalid byte at offset 9\)"),
        (b'{"a": 1}\nnope\n', r"bad.jsonl:2: not JSON .*--input expects one JSON object per line"),
        (b"[1, 2]\n", r"bad.jsonl:1: expected a JSON object, found list"),
    ],
)
def test_bad_files_name_the_flag_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_jsonl(path, "--input")
    with pytest.raises(DataError, match=r"--input .*none.jsonl: no such file"):
        read_records(tmp_path / "none.jsonl", "--input")
