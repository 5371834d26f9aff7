"""JSONL files given on the command line (prompts, eval inputs and samples): one JSON object per line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cdlm.errors import DataError


def read_records(path: Path, flag: str) -> list[tuple[int, dict[str, Any]]]:
    """Return ``(line number, object)`` for every non-blank line of ``path`` (an empty list for an empty file).

    Args:
        path: the file.
        flag: the option that named it (``--prompts-file``), for the messages.

    Raises:
        DataError: the file is missing, unreadable or not UTF-8, or a line is not a JSON object; the message
            names the flag, the file and the line.
    """
    if not path.is_file():
        raise DataError(f"{flag} {path}: no such file")
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{flag} {path}: not UTF-8 text (invalid byte at offset {err.start})") from None
    except OSError as err:
        raise DataError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    records = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg}); {flag} expects one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
        records.append((number, record))
    return records
