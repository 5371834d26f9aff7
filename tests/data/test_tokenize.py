from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from cdlm.config import DataConfig
from cdlm.data import tokenize
from cdlm.data.tokenize import SpecialIds, encode, load_tokenizer, special_ids
from cdlm.errors import DataError

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Packing the quick rows: the fox, the dog and the loader.",
    "Émile ate crème brûlée — twice!",
] * 20


def test_bpe_trains_caches_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(vocab_size=300)
    tok = load_tokenizer(cfg, tmp_path, CORPUS)
    assert len(tok) == 300 and (tmp_path / "tokenizer.json").is_file()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert special_ids(tok) == SpecialIds(pad=0, eos=1)
    ids = tok("the quick fox", add_special_tokens=False)["input_ids"]
    assert len(ids) < len("the quick fox")  # merges were learned
    assert tok.decode(ids) == "the quick fox"
    assert tok.decode(tok("naïve ✓ 漢字")["input_ids"]) == "naïve ✓ 漢字"  # byte-level: no unknowns

    def no_training(*args: object) -> None:
        raise AssertionError("the cached tokenizer must be reused")

    monkeypatch.setattr(tokenize, "train_bpe", no_training)
    again = load_tokenizer(cfg, tmp_path, [])
    assert again("the quick fox", add_special_tokens=False)["input_ids"] == ids


def test_cached_vocab_mismatch_is_an_error(tmp_path: Path) -> None:
    load_tokenizer(DataConfig(vocab_size=300), tmp_path, CORPUS)
    with pytest.raises(DataError, match=r"vocab size': 300.*delete .*tokenizer.json.*data.vocab_size=300"):
        load_tokenizer(DataConfig(vocab_size=320), tmp_path, CORPUS)


def test_bpe_vocab_limits(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least 259"):
        load_tokenizer(DataConfig(vocab_size=100), tmp_path, CORPUS)
    with pytest.raises(DataError, match="only supports .* lower data.vocab_size"):
        load_tokenizer(DataConfig(vocab_size=5000), tmp_path, ["tiny corpus"])
    assert not (tmp_path / "tokenizer.json").exists()


def test_pretrained_from_local_directory(tmp_path: Path) -> None:
    tok = load_tokenizer(DataConfig(vocab_size=300), tmp_path / "run", CORPUS)
    tok.save_pretrained(tmp_path / "saved")
    loaded = load_tokenizer(DataConfig(tokenizer=str(tmp_path / "saved")), tmp_path / "other", [])
    assert loaded("the dog")["input_ids"] == tok("the dog")["input_ids"]
    with pytest.raises(DataError, match="data.tokenizer 'no-such-owner/no-such-tokenizer'"):
        load_tokenizer(DataConfig(tokenizer="no-such-owner/no-such-tokenizer"), tmp_path, [])


def test_special_ids_without_pad_fall_back_to_eos() -> None:
    raw = Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    assert special_ids(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")) == SpecialIds(pad=1, eos=1)
    with pytest.raises(DataError, match="no EOS token"):
        special_ids(PreTrainedTokenizerFast(tokenizer_object=raw))


def test_encode_batches_match_single_calls(tmp_path: Path) -> None:
    tok = load_tokenizer(DataConfig(vocab_size=300), tmp_path, CORPUS)
    texts = CORPUS[:7]
    assert list(encode(tok, texts, batch_size=3)) == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_tokenizer_json_file_is_loaded_as_is(tmp_path: Path) -> None:
    trained = tokenize.train_bpe(CORPUS, 300)
    path = tmp_path / "release" / "tokenizer.json"
    path.parent.mkdir()
    trained.save(str(path))
    tok = load_tokenizer(DataConfig(tokenizer=str(path)), tmp_path / "run", texts=())
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 300
    assert tok("the quick fox", add_special_tokens=False)["input_ids"] == trained.encode("the quick fox").ids
    assert not (tmp_path / "run").exists()  # nothing trained or cached


def test_tokenizer_json_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such tokenizer.json file"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "missing.json")), tmp_path, texts=())
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="not a tokenizers JSON file"):
        load_tokenizer(DataConfig(tokenizer=str(bad)), tmp_path, texts=())
