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
    if not torch.isfinite(scores.sum()):  # one cheap pass; an overflowing sum of finite values only costs a no-op
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


def greedy_linear(features: Tensor, weight: Tensor, bias: Tensor | None = None, *, screen: bool = True) -> Tensor:
    """Return ``select_tokens(F.linear(features, weight, bias))`` at temperature 0 without all fp32 logits.

    With ``screen``, a bf16 product (4–5× faster than fp32 on CPUs with bf16 units) gives every logit ℓ_rv up
    to a bound E_r per row; only the candidates within 2·E_r of their row's best are recomputed in fp32, and
    the argmax (first index on ties) is taken among them. With h̃ = bf16(h), δh = h − h̃ (likewise w, b):
    ``h·w − h̃·w̃ = δh·w + h̃·δw``, so by Cauchy–Schwarz
    ``E_r = ‖δh_r‖·max‖w‖ + ‖h̃_r‖·2⁻⁸·max‖w‖ + max|δb| + 2⁻⁸·max_v|ℓ̃_rv| + C·2⁻²²·‖h_r‖·max‖w‖``
    (input rounding, bias rounding, bf16 output rounding, fp32 accumulation), taken ×1.25 for second-order
    terms and the bf16 threshold. The true argmax is therefore always a candidate. The candidates' fp32 dot
    products are summed in another order than a full GEMM, so the ids can differ from the full path only
    where two logits of a row lie within fp32 rounding (≈1e-6 relative) of each other.

    Args:
        features: (..., C) fp32 inputs of the vocabulary projection.
        weight: (V, C) projection weight.
        bias: (V,) projection bias, or None.
        screen: False computes the full fp32 logits (the exact path); so does a device without fast bf16,
            non-finite inputs, or a screen that keeps more than 16 candidates per row on average.

    Returns:
        (...) int64 ids.
    """
    h = features.reshape(-1, features.shape[-1]).float()  # (N, C)
    screened = _screened_argmax(h, weight, bias) if screen and _fast_bf16(h.device) else None
    if screened is None:
        return select_tokens(F.linear(h, weight, bias)[None])[0].reshape(features.shape[:-1])
    return screened.reshape(features.shape[:-1])


def _fast_bf16(device: torch.device) -> bool:
    """Whether a bf16 matrix product is native here (CPU with bf16 instructions through oneDNN)."""
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _screened_argmax(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """Row argmax of ``h·Wᵀ + b`` (h (N, C)) from a bf16 screen, or None when the fp32 path must run."""
    h16, w16 = h.bfloat16(), weight.bfloat16()
    b16 = None if bias is None else bias.bfloat16()
    approx = F.linear(h16, w16, b16)  # (N, V) bf16; elementwise bf16 ops are slow on CPU, so few passes below
    best, low = approx.amax(dim=-1, keepdim=True).float(), approx.amin(dim=-1, keepdim=True).float()  # (N, 1)
    if not (torch.isfinite(best).all() and torch.isfinite(low).all()):  # NaN propagates through amax/amin
        return None
    h_norm, w_norm = h.norm(dim=-1, keepdim=True), weight.norm(dim=-1).amax()  # (N, 1), ()
    dh_norm = (h - h16.float()).norm(dim=-1, keepdim=True)  # (N, 1) ‖δh_r‖
    bound = (
        dh_norm * w_norm
        + 2.0**-8 * (h_norm + dh_norm) * w_norm  # ‖h̃‖·‖δw‖ with ‖δw‖ ≤ 2⁻⁸‖w‖
        + (0.0 if bias is None else (bias - b16.float()).abs().amax())
        + 2.0**-8 * torch.maximum(best.abs(), low.abs())
        + h.shape[-1] * 2.0**-22 * h_norm * w_norm
    )  # (N, 1) E_r
    rows, cols = (approx >= (best - 2.5 * bound).to(approx.dtype)).nonzero(as_tuple=True)  # (n,) candidates
    if rows.numel() > 16 * h.shape[0]:
        return None
    exact = (h[rows] * weight[cols]).sum(dim=-1)  # (n,) fp32 candidate logits
    if bias is not None:
        exact = exact + bias[cols]
    top = torch.full((h.shape[0],), float("-inf"), device=h.device).scatter_reduce(0, rows, exact, "amax")
    vocab = weight.shape[0]
    first = torch.where(exact == top[rows], cols, vocab)  # (n,) the id where a candidate is its row's max
    return torch.full((h.shape[0],), vocab, device=h.device).scatter_reduce(0, rows, first, "amin")


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
