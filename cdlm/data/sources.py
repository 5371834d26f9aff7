"""Text sources: CPython's bundled documentation, local files and directories, or a hub dataset.

Every source becomes a :class:`datasets.Dataset` with a ``text`` column (and a ``source`` column for
seq2seq, when ``data.source_field`` is set). Local formats:

* ``.txt`` / ``.txt.gz``: one document per paragraph, i.e. per block of lines separated by one or more
  blank lines (lines of ASCII whitespace only); each paragraph is stripped and its inner line breaks are kept
  (as line feeds). A file with one document per line must therefore separate them by blank lines (or be converted
  to ``.jsonl``). :func:`load_texts` reads them line by line into an on-disk Arrow table, so their size does
  not bound memory; the row cache reads plain ``.txt`` sources in place instead (:func:`plain_text_files`,
  :mod:`cdlm.data.chunks`).
* ``.jsonl`` / ``.json``: JSON lines or a JSON list of records.
* ``.parquet``, and ``.arrow`` in the streaming format written by ``datasets``.
* a directory: a ``Dataset.save_to_disk`` directory, or a directory whose top-level files of the formats
  above are concatenated in name order, except those named in ``data.holdout``.

``data.split`` applies to hub datasets and to ``save_to_disk`` directories holding a ``DatasetDict``.

A source without a ``data.text_field`` column but with an ``input_ids`` column is already tokenised: it is
returned as its ``input_ids`` column and never re-tokenised. With ``data.streaming`` every source is read as a
``datasets.IterableDataset`` in file order (:func:`stream_source`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, Features, IterableDataset, Value
from datasets.exceptions import DatasetGenerationError

from cdlm.config import DataConfig
from cdlm.errors import DataError

BUILTIN_PYDOC = "builtin:pydoc"
_TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_TEXT_SUFFIXES = (".txt", ".txt.gz")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_STRING_DTYPES = ("string", "large_string")
TOKEN_COLUMN = "input_ids"
_TEXT_FEATURES = Features({"text": Value("string")})
_TEXT_WRITER_ROWS = 20_000  # paragraphs per Arrow record batch: few headers to touch when the table is opened
_BLANK = b" \t\r\f\v\n"  # a line of these bytes only is blank: it ends a paragraph
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def load_texts(cfg: DataConfig) -> Dataset:
    """Load the corpus named by ``cfg.source`` as rows of ``text`` (and ``source`` for seq2seq), or of token ids.

    Args:
        cfg: the run's data section; reads ``source``, ``subset``, ``split``, ``text_field``, ``source_field``,
            ``holdout`` and ``max_rows``.

    Returns:
        A dataset with exactly the columns ``text`` and, when ``cfg.source_field`` is set, ``source``; or, for an
        already tokenised source, exactly the column ``input_ids``.

    Raises:
        DataError: a file or directory is missing, a column is absent or not text, a hold-out file does not
            exist, the hub dataset cannot be loaded, or no rows remain.
    """
    raw = _load_raw(cfg, streaming=False)
    assert isinstance(raw, Dataset)
    if len(raw) == 0:
        raise empty_source(cfg)
    ds = _select_columns(raw, cfg, raw.features)
    if cfg.max_rows is not None and len(ds) > cfg.max_rows:
        ds = ds.select(range(cfg.max_rows))
    return ds


def stream_source(cfg: DataConfig) -> IterableDataset:
    """Open the corpus of ``cfg.source`` as a stream, in file order, with the columns :func:`load_texts` gives.

    Raises:
        DataError: as :func:`load_texts`; an empty stream is reported when it is first read.
    """
    raw = _load_raw(cfg, streaming=True)
    if isinstance(raw, Dataset):
        raw = raw.to_iterable_dataset()
    first = next(iter(raw), None)
    if first is None:
        raise empty_source(cfg)
    features = raw.features or Features({k: _infer_feature(v) for k, v in first.items()})
    ds = _select_columns(raw, cfg, features)
    return ds.take(cfg.max_rows) if cfg.max_rows is not None else ds


def plain_text_files(cfg: DataConfig) -> list[Path] | None:
    """Return the ``.txt`` files of a local source whose paragraphs are its documents as they are, else None.

    That is a ``.txt`` file, or a directory whose files (minus ``data.holdout``) are all ``.txt``, read with the
    default ``data.text_field`` and no ``data.source_field`` or ``data.max_rows``. Such a source can be read in
    place, in parallel chunks (:mod:`cdlm.data.chunks`), giving the documents :func:`load_texts` gives.

    Raises:
        DataError: as :func:`load_texts` for a directory (a hold-out file missing, no usable files).
    """
    path = Path(cfg.source).expanduser()
    if cfg.max_rows is not None or cfg.source_field is not None or cfg.text_field != "text":
        return None
    if path.is_file() and not cfg.holdout:
        files = [path]
    elif path.is_dir() and not _is_saved_dataset(path):
        files = _dir_files(path, cfg)
    else:
        return None
    return files if all(p.name.endswith(".txt") for p in files) else None


def paragraphs(lines: Iterable[bytes], name: str) -> Iterator[str]:
    """Yield the documents of a text file's lines: its blank-line-separated paragraphs, stripped.

    Args:
        lines: the file's lines as bytes, each ending with a line feed (the last one may not).
        name: the file, for errors.

    Raises:
        DataError: a paragraph is not UTF-8.
    """
    block: list[bytes] = []
    for line in lines:
        if line.strip(_BLANK):
            block.append(line)
        elif block:
            yield _paragraph(block, name)
            block = []
    if block:
        yield _paragraph(block, name)


def _paragraph(block: list[bytes], name: str) -> str:
    """One paragraph's text: its lines decoded, every line break a line feed (as Python's text mode), stripped."""
    try:
        text = b"".join(block).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: cannot be read as UTF-8 text ({err})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def empty_source(cfg: DataConfig) -> DataError:
    """The error for a source without a single row."""
    return DataError(f"data.source {cfg.source!r}: the dataset is empty (no rows); point data.source at some text")


def is_tokenized(columns: list[str]) -> bool:
    """Whether rows with these columns (from :func:`load_texts` / :func:`stream_source`) hold token ids."""
    return columns == [TOKEN_COLUMN]


def source_fingerprint(cfg: DataConfig) -> str:
    """Return a hash naming the source's content cheaply: file names, sizes and modification times, or the hub id.

    Reads no data, so that a cached corpus is found in well under a second whatever its size.
    """
    path = Path(cfg.source).expanduser()
    if cfg.source == BUILTIN_PYDOC:
        stamp: object = ["pydoc", sys.version]
    elif path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        stamp = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    else:
        stamp = ["hub", cfg.source, cfg.subset, cfg.split]
    fields = [cfg.text_field, cfg.source_field, cfg.holdout, cfg.max_rows]
    return hashlib.sha256(json.dumps([stamp, fields]).encode()).hexdigest()[:16]


def _infer_feature(value: object) -> Value | datasets.Sequence:
    """The feature of one value of a stream whose features are unknown (enough to check a column's kind)."""
    if isinstance(value, str):
        return Value("string")
    if isinstance(value, list):
        return datasets.Sequence(Value("int64"))
    return Value("null")


def _load_raw(cfg: DataConfig, *, streaming: bool) -> Dataset | IterableDataset:
    """Load every column of the source, before column selection."""
    path = Path(cfg.source).expanduser()
    if cfg.holdout and not path.is_dir():
        raise DataError(f"data.holdout {cfg.holdout} is set but data.source {cfg.source!r} is not a local directory")
    if cfg.source == BUILTIN_PYDOC:
        return _pydoc()
    if cfg.source.startswith("builtin:"):
        raise DataError(f"data.source {cfg.source!r}: unknown builtin; available: {BUILTIN_PYDOC!r}")
    if path.is_dir():
        return _load_dir(path, cfg, streaming)
    if path.is_file():
        return _load_files([path], streaming)
    if _looks_like_path(cfg.source) or "/" not in cfg.source:
        raise DataError(
            f"data.source {cfg.source!r}: no such file or directory, and not a hub dataset id (owner/name); "
            f"give a local file or directory, {BUILTIN_PYDOC!r}, or a hub id"
        )
    return _load_hub(cfg, streaming)


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


def _load_files(paths: list[Path], streaming: bool) -> Dataset | IterableDataset:
    """Load local files of one supported format: eagerly into Arrow tables, or as a stream."""
    if not streaming:
        parts = [_load_file(p) for p in paths]
        for part, p in zip(parts[1:], paths[1:], strict=True):
            if part.features != parts[0].features:
                raise DataError(
                    f"{p}: columns {dict(part.features)} differ from {paths[0]}'s {dict(parts[0].features)}; "
                    "files of one directory must share their columns"
                )
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if all(p.name.endswith(_TEXT_SUFFIXES) for p in paths):
        return IterableDataset.from_generator(
            _paragraph_records, gen_kwargs={"paths": [str(p) for p in paths]}, features=_TEXT_FEATURES
        )
    builders = {_FILE_BUILDERS.get(p.suffix) for p in paths}
    if len(builders) != 1 or None in builders:
        raise DataError(
            f"data.streaming: files {[p.name for p in paths]} must all be of one of the formats "
            f"{', '.join(_TABLE_SUFFIXES)}, or all .txt / .txt.gz"
        )
    builder = builders.pop()
    assert builder is not None
    return datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train", streaming=True)


def _load_file(path: Path) -> Dataset:
    """Load one local file of a supported format."""
    name = path.name
    if name.endswith(_TEXT_SUFFIXES):
        stamp = f"{path.stat().st_size}:{path.stat().st_mtime_ns}"  # a changed file is read again, not reused
        try:
            return Dataset.from_generator(
                _paragraph_records,
                gen_kwargs={"paths": [str(path)], "stamp": stamp},
                features=_TEXT_FEATURES,
                writer_batch_size=_TEXT_WRITER_ROWS,
            )
        except DatasetGenerationError as err:  # datasets wraps what the generator raised
            if isinstance(err.__cause__, DataError):
                raise err.__cause__ from None
            raise DataError(f"{path}: cannot be read as text ({err.__cause__ or err})") from None
        except ValueError:  # datasets refuses a generator that yields nothing: the file has no paragraphs
            return Dataset.from_dict({"text": []}, features=_TEXT_FEATURES)
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


def _paragraph_records(paths: list[str], stamp: str = "") -> Iterator[dict[str, str]]:
    """Yield ``{"text": paragraph}`` for the :func:`paragraphs` of (gzipped) text files, in order.

    Reads line by line; ``stamp`` only keys the datasets cache (file size and time).
    """
    for name in paths:
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(name, "rb") as f:
                yield from ({"text": text} for text in paragraphs(f, name))
        except (OSError, EOFError) as err:
            raise DataError(f"{name}: cannot be read as UTF-8 text ({err})") from None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_dir(path: Path, cfg: DataConfig, streaming: bool) -> Dataset | IterableDataset:
    """Load a ``save_to_disk`` directory, or concatenate the supported files of a directory minus hold-outs."""
    if _is_saved_dataset(path):
        return _pick_split(datasets.load_from_disk(str(path)), cfg.split, str(path))
    return _load_files(_dir_files(path, cfg), streaming)


def _dir_files(path: Path, cfg: DataConfig) -> list[Path]:
    """The supported files of a directory, in name order, minus ``data.holdout``.

    Raises:
        DataError: a hold-out file is not there, or no file is left.
    """
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
    return kept


def _pick_split(loaded: Dataset | DatasetDict, split: str, where: str) -> Dataset:
    if isinstance(loaded, Dataset):
        return loaded
    if split not in loaded:
        raise DataError(f"data.split {split!r} not in {where}; available splits: {sorted(loaded)}")
    return loaded[split]


def _load_hub(cfg: DataConfig, streaming: bool) -> Dataset | IterableDataset:
    """Load ``cfg.source`` from the Hugging Face hub (or its local cache)."""
    try:
        return datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split, streaming=streaming)
    except (OSError, ValueError) as err:
        raise DataError(
            f"data.source {cfg.source!r} (subset {cfg.subset!r}, split {cfg.split!r}): not a local path and the hub "
            f"dataset could not be loaded: {err}"
        ) from err


def _select_columns(ds: Dataset | IterableDataset, cfg: DataConfig, features: Features) -> Dataset | IterableDataset:
    """Keep ``text_field`` as ``text`` (and ``source_field`` as ``source``), or ``input_ids``; check their kinds."""
    if cfg.source_field == cfg.text_field:
        raise DataError(f"data.source_field and data.text_field are both {cfg.text_field!r}; they must differ")
    if cfg.text_field not in features and TOKEN_COLUMN in features and cfg.source_field is None:
        inner = getattr(features[TOKEN_COLUMN], "feature", None)
        if not str(getattr(inner, "dtype", "")).startswith(("int", "uint")):
            raise DataError(
                f"data.source {cfg.source!r}: column {TOKEN_COLUMN!r} should hold lists of token ids, "
                f"found {features[TOKEN_COLUMN]}"
            )
        return ds.select_columns([TOKEN_COLUMN])
    wanted = {cfg.text_field: "text"}
    if cfg.source_field is not None:
        wanted[cfg.source_field] = "source"
    for field_name, role in wanted.items():
        key = "data.text_field" if role == "text" else "data.source_field"
        if field_name not in features:
            raise DataError(
                f"{key} {field_name!r}: no such column in {cfg.source!r}; available columns: {list(features)}"
            )
        dtype = getattr(features[field_name], "dtype", None)
        if dtype not in _STRING_DTYPES:
            raise DataError(
                f"{key} {field_name!r} in {cfg.source!r}: expected a text column, found {features[field_name]}"
            )
    return ds.select_columns(list(wanted)).rename_columns({k: v for k, v in wanted.items() if k != v})
