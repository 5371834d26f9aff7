"""Token selection from decoder logits, shared by every method (Cola spec §7).

The order of operations is the reference's: clean non-finite logits, repetition penalty (even when
greedy), then argmax for temperatures below 1e-5, else temperature, top-k (ties kept), top-p (the most
likely token always kept) and a multinomial draw from ``generator``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cdlm.errors import DataError

GREEDY_BELOW = 1e-5
"""Temperatures below this select the argmax (Cola spec §7 step 4)."""


def select_tokens(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    previous_ids: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Select one token per position from logits.

    Args:
        logits: (B, L, V) float logits; not modified.
        temperature: below 1e-5 means argmax (first index on ties); otherwise logits are divided by it.
        top_k: keep the logits ≥ the k-th largest per position (ties kept); 0 disables.
        top_p: keep the smallest prefix of the sorted distribution whose mass exceeds p (the first token
            always kept); 1 disables.
        repetition_penalty: p applied to every id of ``previous_ids`` at all L positions of its row:
            a negative logit is multiplied by p, a non-negative one divided by p; 1 disables.
        previous_ids: (B, P) int64 ids already generated for each row (the penalty's history), or None.
        generator: source of the multinomial draw; required when ``temperature ≥ 1e-5``.

    Returns:
        (B, L) int64 token ids.

    Raises:
        DataError: logits are not 3-D, ``previous_ids`` does not match the batch, or sampling lacks a generator.
    """
    if logits.dim() != 3:
        raise DataError(f"select_tokens: expected logits (B, L, V), got shape {tuple(logits.shape)}")
    batch, length, vocab = logits.shape
    scores = logits.reshape(batch * length, vocab)  # (B·L, V)
    if not torch.isfinite(scores).all():
        scores = torch.nan_to_num(scores, nan=0.0, posinf=1e4, neginf=-1e4)
    if previous_ids is not None and repetition_penalty != 1.0:
        if previous_ids.dim() != 2 or previous_ids.shape[0] != batch:
            raise DataError(
                f"select_tokens: previous_ids must be (B={batch}, P), got shape {tuple(previous_ids.shape)}"
            )
        scores = _penalise(scores, previous_ids.repeat_interleave(length, dim=0), repetition_penalty)
    if temperature < GREEDY_BELOW:
        return scores.argmax(dim=-1).reshape(batch, length)
    if generator is None:
        raise DataError(f"select_tokens: temperature={temperature} samples and needs generator=torch.Generator()")
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        scores = _keep_top_k(scores, min(top_k, vocab))
    if 0.0 < top_p < 1.0:
        scores = _keep_top_p(scores, top_p)
    probs = F.softmax(scores, dim=-1)
    if probs.isnan().any():
        probs = torch.nan_to_num(probs, nan=1.0 / vocab)
    ids = torch.multinomial(probs.to(generator.device), 1, generator=generator)  # (B·L, 1)
    return ids.to(logits.device).reshape(batch, length)


def _penalise(scores: Tensor, history: Tensor, penalty: float) -> Tensor:
    """Apply the CTRL repetition penalty to the ids of ``history`` (B·L, P) in ``scores`` (B·L, V)."""
    seen = scores.gather(1, history)  # (B·L, P)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, history, seen)


def _keep_top_k(scores: Tensor, k: int) -> Tensor:
    """Set to −inf every logit below the k-th largest of its row (ties with it kept)."""
    kth = scores.topk(k, dim=-1).values[:, -1:]  # (B·L, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def _keep_top_p(scores: Tensor, top_p: float) -> Tensor:
    """Set to −inf the tail of each row past cumulative probability ``top_p`` (shifted right: first kept)."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)  # (B·L, V)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = torch.zeros_like(cumulative, dtype=torch.bool)
    remove[:, 1:] = cumulative[:, :-1] > top_p
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
