"""Tokenizers: a byte-level BPE trained on the corpus and cached in the run directory, or a pretrained one.

The trained BPE has the special tokens ``<pad>`` (id 0), ``</s>`` (EOS, id 1) and ``<unk>`` (id 2), then the
256 byte symbols, then merges up to ``data.vocab_size``. Texts are encoded without special tokens; the packer
adds EOS between documents (:mod:`cdlm.data.pack`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cdlm.config import DataConfig
from cdlm.errors import DataError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
_SPECIALS = (PAD, EOS, UNK)  # ids 0, 1, 2
_MIN_BPE_VOCAB = len(_SPECIALS) + 256  # specials + every byte


@dataclass(frozen=True)
class SpecialIds:
    """The token ids the data pipeline inserts.

    Attributes:
        pad: id written into padding positions when ``data.pad_token`` is "pad".
        eos: id appended after each document, and written into padding when ``data.pad_token`` is "eos".
    """

    pad: int
    eos: int


def load_tokenizer(cfg: DataConfig, cache_dir: Path, texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """Return the run's tokenizer: the cached or newly trained BPE, a ``tokenizer.json`` file, or a pretrained one.

    Args:
        cfg: data section; ``tokenizer`` is "bpe", a path to a Hugging Face ``tokenizers`` JSON file (e.g. a
            release's ``tokenizer.json``; no special tokens are assigned), or a hub id / local directory
            (``AutoTokenizer.from_pretrained``); ``vocab_size`` sizes the BPE.
        cache_dir: where the trained BPE lives as ``tokenizer.json`` (the run directory); reused when present.
        texts: the training corpus; only iterated when a BPE has to be trained.

    Returns:
        A Hugging Face tokenizer; for "bpe" a ``PreTrainedTokenizerFast`` with pad id 0 and EOS id 1.

    Raises:
        DataError: the cached tokenizer does not match ``cfg``, the corpus is too small for the vocabulary,
            or the tokenizer file or pretrained tokenizer cannot be loaded.
    """
    if cfg.tokenizer.endswith(".json"):
        return _from_file(Path(cfg.tokenizer))
    if cfg.tokenizer != "bpe":
        try:
            return AutoTokenizer.from_pretrained(cfg.tokenizer)
        except (OSError, ValueError) as err:
            raise DataError(f"data.tokenizer {cfg.tokenizer!r}: cannot load it with AutoTokenizer: {err}") from err
    path = Path(cache_dir) / TOKENIZER_FILE
    if path.is_file():
        tok = _wrap(Tokenizer.from_file(str(path)))
        _check_cached(tok, cfg, path)
        return tok
    if cfg.vocab_size < _MIN_BPE_VOCAB:
        raise DataError(
            f"data.vocab_size {cfg.vocab_size}: a byte-level BPE needs at least {_MIN_BPE_VOCAB} "
            f"({len(_SPECIALS)} special tokens + 256 bytes)"
        )
    tok = train_bpe(texts, cfg.vocab_size)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise DataError(
            f"data.vocab_size {cfg.vocab_size}: the corpus {cfg.source!r} only supports {tok.get_vocab_size()} "
            "BPE tokens; lower data.vocab_size or use more text"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    logger.info("trained a %d-token byte-level BPE on %s, saved to %s", cfg.vocab_size, cfg.source, path)
    return _wrap(tok)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with the special tokens ``<pad>``, ``</s>``, ``<unk>`` (ids 0, 1, 2).

    Args:
        texts: the corpus, one document per string.
        vocab_size: the target vocabulary size (specials, bytes and merges); reached when the corpus allows.

    Returns:
        The trained ``tokenizers.Tokenizer``.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _from_file(path: Path) -> PreTrainedTokenizerFast:
    """Load a ``tokenizers`` JSON file as a fast tokenizer."""
    if not path.is_file():
        raise DataError(f"data.tokenizer {str(path)!r}: no such tokenizer.json file")
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as err:  # the tokenizers library raises its own Exception subclass for a bad file
        raise DataError(f"data.tokenizer {str(path)!r}: not a tokenizers JSON file ({err})") from err


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def _check_cached(tok: PreTrainedTokenizerFast, cfg: DataConfig, path: Path) -> None:
    """Check that a cached BPE was trained for this config."""
    found = {"vocab size": len(tok), "pad id": tok.pad_token_id, "eos id": tok.eos_token_id}
    expected = {"vocab size": cfg.vocab_size, "pad id": 0, "eos id": 1}
    if found != expected:
        raise DataError(
            f"{path}: cached tokenizer has {found}, expected {expected} for data.vocab_size={cfg.vocab_size}; "
            f"delete {path} to retrain it, or set data.vocab_size={len(tok)}"
        )


def special_ids(tok: PreTrainedTokenizerBase) -> SpecialIds:
    """Return the pad and EOS ids of ``tok``; a tokenizer without a pad token pads with EOS.

    Raises:
        DataError: the tokenizer has no EOS token.
    """
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {tok.name_or_path!r} has no EOS token; the packer needs one between documents")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return SpecialIds(pad=int(pad), eos=int(tok.eos_token_id))


def encode(tok: PreTrainedTokenizerBase, texts: Iterable[str], batch_size: int = 1024) -> Iterator[list[int]]:
    """Yield the token ids of each text, without special tokens, encoding ``batch_size`` texts at a time."""
    it = iter(texts)
    while chunk := list(islice(it, batch_size)):
        yield from tok(chunk, add_special_tokens=False)["input_ids"]
