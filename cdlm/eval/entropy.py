"""Unigram entropy of a sample's judge tokens (ELF spec §6, ``utils/metrics_utils.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def unigram_entropy(ids: Sequence[int] | np.ndarray) -> float:
    """Return the entropy, in nats, of the token frequencies of one sample.

    ``p = counts / total`` with float32 counts and ``H = −Σ p·ln(p + 1e-10)``, exactly as the reference; an empty
    sample has entropy 0.

    Args:
        ids: the sample's token ids under the judge's tokenizer, padding excluded.
    """
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    probs = counts.astype(np.float32) / counts.sum()
    return float(-np.sum(probs * np.log(probs + 1e-10)))


def mean_entropy(rows: Sequence[Sequence[int] | np.ndarray]) -> float:
    """Return the mean :func:`unigram_entropy` over samples (the figure the ELF paper reports beside Gen PPL)."""
    if not rows:
        return float("nan")
    return sum(unigram_entropy(r) for r in rows) / len(rows)
