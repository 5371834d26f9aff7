"""Generative perplexity under a Hugging Face causal-LM judge (ELF spec §6, ``utils/metrics_utils.py``).

The reference's rules, kept exactly:

* the judge's tokenizer, with ``pad := eos`` (the reference's GPT-2 has no pad token; a judge with its own pad
  pads with EOS too, so that padding is never scored) (``use_fast`` except for mT5);
* empty or whitespace-only samples are dropped (``scripts/eval_ppl.py``);
* **all** samples are retokenised at once, ``truncation=True, padding=True`` (to the longest sample),
  ``max_length`` 1024, no BOS; each batch is scored in chunks of ``context_size`` positions (one chunk at 1024);
* per position ``nll = logsumexp(logits.float()) − logits[target].float()`` from logits in the judge's dtype
  (bf16 in the reference);
* a position counts when its target is a real token, or the **first** EOS/pad (the judge is scored on predicting
  the end of the text); the first token is never a target;
* ``PPL = exp(Σ nll·valid / Σ valid)``, pooled over every token of every sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cdlm.errors import CheckpointError, DataError

JudgeDtype = Literal["bf16", "fp32"]
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Judge:
    """A causal LM that scores text, and its tokenizer (whose tokens the entropy also counts).

    Attributes:
        name: what ``--judge`` said (hub id or local path).
        tokenizer: the judge's tokenizer, padding with EOS (``pad := eos``).
        model: the model in eval mode, or None when only its tokenizer was loaded (entropy alone).
        dtype: ``"bf16"`` (the reference's) or ``"fp32"``.
    """

    name: str
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel | None
    dtype: JudgeDtype


def load_judge(
    name_or_path: str, *, dtype: JudgeDtype = "bf16", device: str | torch.device = "cpu", with_model: bool = True
) -> Judge:
    """Load a judge: any ``AutoModelForCausalLM`` (hub id, honouring ``HF_HUB_OFFLINE``, or local directory).

    Args:
        name_or_path: e.g. ``gpt2-large`` (ELF's judge) or a ``save_pretrained`` directory.
        dtype: the judge's weights and logits dtype; the reference uses bf16.
        device: where to run it.
        with_model: False loads the tokenizer only (unigram entropy needs no model).

    Raises:
        CheckpointError: nothing loadable at ``name_or_path``.
    """
    use_fast = "mt5" not in name_or_path.lower()  # parity: utils/metrics_utils.py (mT5 needs the slow tokenizer)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, use_fast=use_fast)
        model = None
        if with_model:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=_TORCH_DTYPES[dtype])
            model = model.to(torch.device(device)).eval()
    except (OSError, ValueError) as err:  # not found, or not a valid path / hub id
        raise CheckpointError(
            f"--judge {name_or_path}: cannot load a causal LM and its tokenizer there ({err}); give a local "
            "save_pretrained directory, or a hub id that is in the cache when HF_HUB_OFFLINE=1"
        ) from None
    if tokenizer.pad_token is None or tokenizer.pad_token_id != tokenizer.eos_token_id:
        # GPT-2 has no pad token and the reference pads with EOS; the scoring rule (real tokens and the first EOS
        # count) relies on it, so a judge with its own pad id (cdlm's BPE: <pad> 0, </s> 1) pads with EOS too,
        # else every padding position would be scored as a target it was never trained to predict
        tokenizer.pad_token = tokenizer.eos_token
    return Judge(name=name_or_path, tokenizer=tokenizer, model=model, dtype=dtype)


def nonempty(texts: Sequence[str]) -> list[str]:
    """Return the samples the reference scores: the non-empty, not whitespace-only ones, in order."""
    return [t for t in texts if isinstance(t, str) and t.strip()]


def retokenize(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise every sample at once, padded to the longest and truncated to ``max_length``.

    Returns:
        ids (S, T) int64 and attention mask (S, T) int64 (1 on real tokens).
    """
    out = tokenizer(
        list(texts),
        return_tensors="np",
        return_token_type_ids=False,
        return_attention_mask=True,
        truncation=True,
        padding=True,
        max_length=max_length,
    )
    return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)


def token_nlls(logits: Tensor, ids: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """Return per-position NLLs and validity weights of one chunk.

    Args:
        logits: (B, T, V) judge logits, in the judge's dtype.
        ids: (B, T) int64 token ids.
        eos_id: the judge's EOS id (also its pad).

    Returns:
        nll (B, T − 1) float32 and valid (B, T − 1) int32: 1 on a real target or the first EOS, else 0.
    """
    pred = logits[:, :-1]  # (B, T-1, V)
    targets = ids[:, 1:]  # (B, T-1)
    log_norm = torch.logsumexp(pred.float(), dim=-1)  # (B, T-1)
    target_logit = pred.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()  # (B, T-1)
    is_eos = ids == eos_id  # (B, T)
    first_eos = is_eos.int().cumsum(dim=-1) == 1  # (B, T): the first EOS and every position up to the second
    # parity: utils/metrics_utils.py adds the two masks, so a real token between a first and a second EOS weighs 2
    valid = first_eos[:, 1:].int() + (~is_eos)[:, 1:].int()  # (B, T-1)
    return log_norm - target_logit, valid


@dataclass(frozen=True)
class Perplexity:
    """Gen PPL of a set of samples.

    Attributes:
        ppl: ``exp(Σ nll·valid / Σ valid)`` over every scored token.
        per_sample: each sample's own PPL (NaN when it had no scored token).
        tokens: each sample's judge token ids, padding excluded (what the entropy counts).
        num_dropped: empty or whitespace-only samples left out.
    """

    ppl: float
    per_sample: list[float]
    tokens: list[list[int]]
    num_dropped: int


def generative_perplexity(
    judge: Judge,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    context_size: int = 1024,
    on_batch: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """Score ``texts`` with the judge as ``scripts/eval_ppl.py`` does (batch 16, max length 1024 by default).

    Args:
        judge: a loaded :class:`Judge` with its model.
        texts: the samples; empty ones are dropped first.
        batch_size: samples per forward (the reference's in-run evaluation uses 64, its script 16).
        max_length: truncation length of the retokenised samples.
        context_size: positions per scored chunk; at most the judge's own context (GPT-2's ``n_positions``).
        on_batch: called with (batches done, batches in all) after each batch.

    Raises:
        DataError: no non-empty sample, or no sample longer than one judge token.
    """
    if judge.model is None:
        raise ValueError("generative_perplexity needs a judge loaded with_model=True")
    kept = nonempty(texts)
    if not kept:
        raise DataError("gen_ppl: every sample is empty or whitespace; there is nothing to score")
    ids, mask = retokenize(judge.tokenizer, kept, max_length)
    context_size = min(context_size, getattr(judge.model.config, "max_position_embeddings", None) or context_size)
    device = next(judge.model.parameters()).device
    eos_id = judge.tokenizer.eos_token_id
    nll_sum = np.zeros(len(kept), dtype=np.float64)
    count = np.zeros(len(kept), dtype=np.float64)
    num_batches = (len(kept) + batch_size - 1) // batch_size
    for b in range(num_batches):
        rows = slice(b * batch_size, min((b + 1) * batch_size, len(kept)))
        for start in range(0, ids.shape[1], context_size):
            chunk = slice(start, start + context_size)
            chunk_ids = torch.from_numpy(ids[rows, chunk]).to(device)  # (B, T)
            chunk_mask = torch.from_numpy(mask[rows, chunk]).to(device)  # (B, T)
            with torch.no_grad():
                logits = judge.model(input_ids=chunk_ids, attention_mask=chunk_mask).logits  # (B, T, V)
            nll, valid = token_nlls(logits, chunk_ids, eos_id)
            weights = valid.cpu().numpy().astype(np.float64)
            nll_sum[rows] += (nll.cpu().numpy().astype(np.float64) * weights).sum(axis=-1)
            count[rows] += weights.sum(axis=-1)
        if on_batch is not None:
            on_batch(b + 1, num_batches)
    if count.sum() == 0:
        raise DataError(
            f"gen_ppl: none of the {len(kept)} samples has a judge token to score after its first (each is one judge "
            "token); a judge scores a token from the ones before it, so give longer samples or a finer judge"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        per_sample = np.where(count > 0, np.exp(nll_sum / count), np.nan)
    tokens = [ids[i, : int(mask[i].sum())].tolist() for i in range(len(kept))]
    return Perplexity(
        ppl=float(np.exp(nll_sum.sum() / count.sum())),
        per_sample=per_sample.tolist(),
        tokens=tokens,
        num_dropped=len(texts) - len(kept),
    )


def judge_tokens(judge: Judge, texts: Sequence[str], max_length: int = 1024) -> list[list[int]]:
    """Return the judge token ids of the non-empty samples, padding excluded (entropy without a model)."""
    ids, mask = retokenize(judge.tokenizer, nonempty(texts), max_length)
    return [ids[i, : int(mask[i].sum())].tolist() for i in range(ids.shape[0])]
