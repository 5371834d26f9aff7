from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from cdlm.config import DataConfig
from cdlm.data import pack, tokenize
from cdlm.data.cache import TokenRows, cache_root, token_dtype
from cdlm.data.loader import ResumableLoader
from cdlm.data.pack import PackedData, pack_documents, prepare
from cdlm.data.stream import RowStream
from cdlm.data.tokenize import SpecialIds, train_bpe
from cdlm.errors import DataError
from cdlm.interfaces import MethodSpec, TokenBatch
from cdlm.training.checkpoint import load_checkpoint
from cdlm.training.loop import train
from training.test_loop import Crash, assert_same_run, build, crash_at, make_config, toy  # noqa: F401 (fixture)

TEXT = "\n\n".join(f"Paragraph {i} says {'something ' * (i % 7)}about item {i * 13}." for i in range(120))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved pretrained-style tokenizer (pad 0, EOS 1), for sources that are already tokenised."""
    path = tmp_path_factory.mktemp("tok")
    tokenize._wrap(train_bpe(TEXT.split("\n\n"), 300)).save_pretrained(str(path))
    return path


def rows_of(data: PackedData) -> TokenBatch:
    assert isinstance(data.rows, TokenRows)
    return data.rows.take(np.arange(len(data.rows)))


def write_ids(path: Path, docs: list[list[int]]) -> Path:
    path.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_token_dtype_is_the_smallest_that_fits() -> None:
    assert token_dtype(512) == "uint16" and token_dtype(2**16) == "uint16" and token_dtype(2**16 + 1) == "int32"


def test_cache_is_built_once_in_uint16_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.txt").write_text(TEXT, encoding="utf-8")
    cfg = DataConfig(source=str(tmp_path / "c.txt"), vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "cache"))
    first = rows_of(prepare(cfg, tmp_path))
    (entry,) = cache_root(cfg).iterdir()
    (table,) = entry.glob("rows*.arrow")
    assert datasets.Dataset.from_file(str(table)).features["ids"].feature.dtype == "uint16"

    def no_reading(*args: object) -> None:
        raise AssertionError("a cached corpus must not be read again")

    monkeypatch.setattr(pack, "load_texts", no_reading)  # a source read through Arrow
    monkeypatch.setattr(pack, "plan_chunks", no_reading)  # a plain-text source, read in place
    seen: list[str] = []
    again = prepare(cfg, tmp_path, on_phase=seen.append)
    assert any("reusing cached rows" in s for s in seen)
    assert all(torch.equal(getattr(first, f), getattr(rows_of(again), f)) for f in ("ids", "mask", "cond_mask"))
    assert rows_of(again).ids.dtype == torch.int64
    (tmp_path / "c.txt").write_text(TEXT + "\n\nOne more paragraph.", encoding="utf-8")  # a changed source
    with pytest.raises(AssertionError, match="must not be read again"):
        prepare(cfg, tmp_path)


def test_tokenized_source_is_read_without_tokenizing(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    cfg = DataConfig(
        source=str(write_ids(tmp_path / "ids.jsonl", docs)),
        tokenizer=str(tokenizer_dir),
        seq_len=4,
        cache_dir=str(tmp_path / "cache"),
    )
    monkeypatch.setattr(pack, "encode", None)  # any tokenising call would fail
    got = rows_of(prepare(cfg, tmp_path))
    want = pack_documents(docs, 4, SpecialIds(pad=0, eos=1), "pad")
    assert torch.equal(got.ids, want.ids) and torch.equal(got.mask, want.mask)
    rows = [[3, 4, 5, 6], [7, 8, 9, 10]]  # every row already seq_len long: taken as they are
    as_is = rows_of(prepare(cfg.model_copy(update={"source": str(write_ids(tmp_path / "r.jsonl", rows))}), tmp_path))
    assert as_is.ids.tolist() == rows and bool(as_is.mask.all())


def test_tokenized_source_errors(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = str(write_ids(tmp_path / "ids.jsonl", [[5, 6, 99999]]))
    with pytest.raises(DataError, match="data.tokenizer 'bpe'|not 'bpe'"):
        prepare(DataConfig(source=source, cache_dir=str(tmp_path / "c")), tmp_path)
    with pytest.raises(DataError, match="token id 99999 .* outside the vocabulary"):
        prepare(DataConfig(source=source, tokenizer=str(tokenizer_dir), cache_dir=str(tmp_path / "c")), tmp_path)


def stream_cfg(tmp_path: Path) -> DataConfig:
    (tmp_path / "c.txt").write_text(TEXT, encoding="utf-8")
    return DataConfig(source=str(tmp_path / "c.txt"), vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "cache"))


def test_stream_gives_the_cached_rows_in_order(tmp_path: Path) -> None:
    cfg = stream_cfg(tmp_path)
    cached = rows_of(prepare(cfg, tmp_path))
    stream = prepare(cfg.model_copy(update={"streaming": True}), tmp_path).rows
    assert isinstance(stream, RowStream)
    streamed = [row for row, _, _ in stream.rows(0, 0)]
    assert torch.equal(torch.cat([r.ids for r in streamed]), cached.ids)
    assert torch.equal(torch.cat([r.mask for r in streamed]), cached.mask)


def first_ids(loader: ResumableLoader, n: int) -> list[list[int]]:
    return [next(loader).ids[:, 0].tolist() for _ in range(n)]


def test_stream_loader_resumes_exactly_across_epochs_and_splits_processes(tmp_path: Path) -> None:
    cfg = stream_cfg(tmp_path).model_copy(update={"streaming": True, "max_rows": 40})
    stream = prepare(cfg, tmp_path).rows
    assert isinstance(stream, RowStream)
    straight = ResumableLoader(stream, 5, seed=0)
    expected = first_ids(straight, 12)  # more than one epoch
    assert straight.state_dict()["epoch"] >= 1
    first = ResumableLoader(stream, 5, seed=0)
    head = first_ids(first, 4)
    resumed = ResumableLoader(stream, 5, seed=0)
    resumed.load_state_dict(first.state_dict())
    assert head + first_ids(resumed, 8) == expected
    ranks = [ResumableLoader(stream, 5, seed=0, process_index=r, num_processes=2) for r in range(2)]
    pairs = [first_ids(loader, 2) for loader in ranks]
    assert [pairs[0][k] + pairs[1][k] for k in range(2)] == [
        a + b for a, b in zip(expected[:4:2], expected[1:4:2], strict=True)
    ]
    with pytest.raises(DataError, match="not saved with data.streaming"):
        ResumableLoader(stream, 5, seed=0).load_state_dict({"epoch": 0, "position": 1})


@pytest.mark.parametrize("streaming", [False, True])
def test_training_resumes_exactly_on_tokenized_cached_and_streamed_rows(
    toy: MethodSpec,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    tokenizer_dir: Path,
    streaming: bool,
) -> None:
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 64, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (60,), generator=g)]
    source = write_ids(tmp_path / "ids.jsonl", docs)
    data_cfg = DataConfig(
        source=str(source), tokenizer=str(tokenizer_dir), seq_len=16, streaming=streaming, cache_dir=str(tmp_path)
    )
    cfg = make_config(toy).model_copy(update={"data": data_cfg})
    rows = prepare(data_cfg, tmp_path).rows
    train(cfg, build(toy, cfg), tmp_path / "a", rows)
    with pytest.raises(Crash):
        train(cfg, build(toy, cfg), tmp_path / "b", rows, on_log=crash_at(4))
    train(cfg, build(toy, cfg, init_seed=99), tmp_path / "b", prepare(data_cfg, tmp_path).rows)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert set(load_checkpoint(tmp_path / "b").loader_state) == (
        {"epoch", "position", "doc", "offset"} if streaming else {"epoch", "position"}
    )
