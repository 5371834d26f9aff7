"""The JSONL files ``cdlm eval`` reads: samples to score, conditional inputs, task rows, references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdlm.errors import DataError
from cdlm.jsonl import read_records

TEXT_FIELDS = ("text", "generated", "generate")
"""Where a samples file holds the text: cdlm's ``text``, ELF's ``generated``, Cola's ``generate``."""
SOURCE_FIELDS = ("source", "src", "document")
TARGET_FIELDS = ("target", "reference", "tgt", "summary")


def read_jsonl(path: Path, flag: str) -> list[dict[str, Any]]:
    """Read a JSONL file of objects (blank lines skipped; see :func:`cdlm.jsonl.read_records`).

    Raises:
        DataError: the file is missing or not UTF-8, a line is not a JSON object, or there is no line.
    """
    records = [record for _, record in read_records(path, flag)]
    if not records:
        raise DataError(f"{flag} {path}: the file has no records")
    return records


def field(record: dict[str, Any], names: tuple[str, ...], where: str) -> str:
    """Return the first of ``names`` present in ``record`` as text.

    Raises:
        DataError: none is present, or it is not a string.
    """
    for name in names:
        if name in record:
            value = record[name]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {value!r}")
            return value
    raise DataError(f"{where}: expected one of the fields {list(names)}, found {sorted(record)}")


def texts(records: list[dict[str, Any]], path: Path) -> list[str]:
    """Return the sample texts of a samples file (``text``, ``generated`` or ``generate`` per line)."""
    return [field(r, TEXT_FIELDS, f"{path}:record {i + 1}") for i, r in enumerate(records)]


def pairs(records: list[dict[str, Any]], path: Path) -> tuple[list[str], list[str]]:
    """Return the (sources, targets) of a conditional input file (``source`` and ``target`` per line)."""
    sources = [field(r, SOURCE_FIELDS, f"{path}:record {i + 1}") for i, r in enumerate(records)]
    targets = [field(r, TARGET_FIELDS, f"{path}:record {i + 1}") for i, r in enumerate(records)]
    return sources, targets


def references(path: Path) -> list[str]:
    """Return human reference texts: a JSONL file's ``text`` fields, or a ``.txt`` file's non-empty lines."""
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"--references {path}: no such file")
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts(read_jsonl(path, "--references"), path)
