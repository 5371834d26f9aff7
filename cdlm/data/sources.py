"""Text sources: CPython's bundled documentation, local files and directories, or a hub dataset.

Every source becomes a :class:`datasets.Dataset` with a ``text`` column (and a ``source`` column for
seq2seq, when ``data.source_field`` is set). Local formats:

* ``.txt`` / ``.txt.gz``: one document per paragraph, i.e. per block of lines separated by one or more
  blank lines; each paragraph is stripped and its inner line breaks are kept. A file with one document per
  line must therefore separate them by blank lines (or be converted to ``.jsonl``).
* ``.jsonl`` / ``.json``: JSON lines or a JSON list of records.
* ``.parquet``, and ``.arrow`` in the streaming format written by ``datasets``.
* a directory: a ``Dataset.save_to_disk`` directory, or a directory whose top-level files of the formats
  above are concatenated in name order, except those named in ``data.holdout``.

``data.split`` applies to hub datasets and to ``save_to_disk`` directories holding a ``DatasetDict``.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from cdlm.config import DataConfig
from cdlm.errors import DataError

BUILTIN_PYDOC = "builtin:pydoc"
_TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_TEXT_SUFFIXES = (".txt", ".txt.gz")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_STRING_DTYPES = ("string", "large_string")


def load_texts(cfg: DataConfig) -> Dataset:
    """Load the corpus named by ``cfg.source`` as rows of ``text`` (and ``source`` for seq2seq).

    Args:
        cfg: the run's data section; reads ``source``, ``subset``, ``split``, ``text_field``, ``source_field``,
            ``holdout`` and ``max_rows``.

    Returns:
        A dataset with exactly the columns ``text`` and, when ``cfg.source_field`` is set, ``source``.

    Raises:
        DataError: a file or directory is missing, a column is absent or not text, a hold-out file does not
            exist, the hub dataset cannot be loaded, or no rows remain.
    """
    raw = _load_raw(cfg)
    if len(raw) == 0:
        raise DataError(f"data.source {cfg.source!r}: the dataset is empty (no rows); point data.source at some text")
    ds = _select_columns(raw, cfg)
    if cfg.max_rows is not None and len(ds) > cfg.max_rows:
        ds = ds.select(range(cfg.max_rows))
    if len(ds) == 0:
        raise DataError(f"data.source {cfg.source!r}: the dataset is empty (no rows); point data.source at some text")
    return ds


def _load_raw(cfg: DataConfig) -> Dataset:
    """Load every column of the source, before column selection."""
    path = Path(cfg.source).expanduser()
    if cfg.holdout and not path.is_dir():
        raise DataError(f"data.holdout {cfg.holdout} is set but data.source {cfg.source!r} is not a local directory")
    if cfg.source == BUILTIN_PYDOC:
        return _pydoc()
    if cfg.source.startswith("builtin:"):
        raise DataError(f"data.source {cfg.source!r}: unknown builtin; available: {BUILTIN_PYDOC!r}")
    if path.is_dir():
        return _load_dir(path, cfg)
    if path.is_file():
        return _load_file(path)
    if _looks_like_path(cfg.source) or "/" not in cfg.source:
        raise DataError(
            f"data.source {cfg.source!r}: no such file or directory, and not a hub dataset id (owner/name); "
            f"give a local file or directory, {BUILTIN_PYDOC!r}, or a hub id"
        )
    return _load_hub(cfg)


def _pydoc() -> Dataset:
    """Return the prose of the documentation bundled with CPython, one row per paragraph (columns ``topic``, ``text``).

    Paragraphs are blank-line separated; their lines are joined and whitespace runs collapsed. Code listings and
    tables (paragraphs under 60 characters, under 85% letters and spaces, or with a ``>>>`` prompt) are left out:
    about 1,400 paragraphs, 320k characters of English technical prose, present in every CPython installation.
    """
    from pydoc_data.topics import topics

    rows: dict[str, list[str]] = {"topic": [], "text": []}
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(paragraph.split())
            prose = sum(c.isalpha() or c == " " for c in text)
            if len(text) >= 60 and prose >= 0.85 * len(text) and ">>>" not in text:
                rows["topic"].append(name)
                rows["text"].append(text)
    return Dataset.from_dict(rows)


def _looks_like_path(source: str) -> bool:
    """Whether ``source`` was meant as a local path rather than a hub id (``owner/name`` or ``name``)."""
    return source.startswith((".", "/", "~")) or source.endswith(_TEXT_SUFFIXES + _TABLE_SUFFIXES)


def _is_supported(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_TEXT_SUFFIXES + _TABLE_SUFFIXES)


def _load_file(path: Path) -> Dataset:
    """Load one local file of a supported format."""
    name = path.name
    if name.endswith(_TEXT_SUFFIXES):
        return Dataset.from_dict({"text": _paragraphs(path)})
    if path.stat().st_size == 0:
        return Dataset.from_dict({})
    try:
        if name.endswith((".jsonl", ".json")):
            return Dataset.from_json(str(path))
        if name.endswith(".parquet"):
            return Dataset.from_parquet(str(path))
        if name.endswith(".arrow"):
            return Dataset.from_file(str(path), in_memory=True)
    except Exception as err:  # datasets wraps arrow and JSON errors in several exception types of its own
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: cannot be read as {path.suffix.lstrip('.')} ({first})") from None
    raise DataError(
        f"{path}: unsupported file type; expected one of {', '.join(_TEXT_SUFFIXES + _TABLE_SUFFIXES)} "
        "or a directory of such files"
    )


def _paragraphs(path: Path) -> list[str]:
    """Split a (possibly gzipped) text file into its non-empty, stripped, blank-line-separated paragraphs."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _load_dir(path: Path, cfg: DataConfig) -> Dataset:
    """Load a ``save_to_disk`` directory, or concatenate the supported files of a directory minus hold-outs."""
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _pick_split(datasets.load_from_disk(str(path)), cfg.split, str(path))
    files = sorted(p for p in path.iterdir() if _is_supported(p))
    missing = sorted(set(cfg.holdout) - {p.name for p in files})
    if missing:
        raise DataError(
            f"data.holdout: {missing} not found in {path}; files there: {[p.name for p in files]}. "
            "Name hold-out files by their file name."
        )
    kept = [p for p in files if p.name not in cfg.holdout]
    if not kept:
        raise DataError(
            f"data.source {str(path)!r}: no usable files (expected {', '.join(_TEXT_SUFFIXES + _TABLE_SUFFIXES)}"
            f"{'; all are held out' if files else ''})"
        )
    parts = [_load_file(p) for p in kept]
    for part, p in zip(parts[1:], kept[1:], strict=True):
        if part.features != parts[0].features:
            raise DataError(
                f"{p}: columns {dict(part.features)} differ from {kept[0]}'s {dict(parts[0].features)}; "
                "files of one directory must share their columns"
            )
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _pick_split(loaded: Dataset | DatasetDict, split: str, where: str) -> Dataset:
    if isinstance(loaded, Dataset):
        return loaded
    if split not in loaded:
        raise DataError(f"data.split {split!r} not in {where}; available splits: {sorted(loaded)}")
    return loaded[split]


def _load_hub(cfg: DataConfig) -> Dataset:
    """Load ``cfg.source`` from the Hugging Face hub (or its local cache)."""
    try:
        return datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
    except (OSError, ValueError) as err:
        raise DataError(
            f"data.source {cfg.source!r} (subset {cfg.subset!r}, split {cfg.split!r}): not a local path and the hub "
            f"dataset could not be loaded: {err}"
        ) from err


def _select_columns(ds: Dataset, cfg: DataConfig) -> Dataset:
    """Keep ``text_field`` as ``text`` (and ``source_field`` as ``source``), checking they hold strings."""
    if cfg.source_field == cfg.text_field:
        raise DataError(f"data.source_field and data.text_field are both {cfg.text_field!r}; they must differ")
    wanted = {cfg.text_field: "text"}
    if cfg.source_field is not None:
        wanted[cfg.source_field] = "source"
    for field_name, role in wanted.items():
        key = "data.text_field" if role == "text" else "data.source_field"
        if field_name not in ds.column_names:
            raise DataError(
                f"{key} {field_name!r}: no such column in {cfg.source!r}; available columns: {ds.column_names}"
            )
        dtype = getattr(ds.features[field_name], "dtype", None)
        if dtype not in _STRING_DTYPES:
            raise DataError(
                f"{key} {field_name!r} in {cfg.source!r}: expected a text column, found {ds.features[field_name]}"
            )
    return ds.select_columns(list(wanted)).rename_columns({k: v for k, v in wanted.items() if k != v})
