"""Reference-based text metrics: BLEU and ROUGE (ELF spec §6) and MAUVE (``mauve-text``).

BLEU and ROUGE are the calls of ELF's ``utils/metrics_utils.py``; MAUVE featurises with ``mauve-text``'s own
featuriser (last-token hidden state of the encoder's final layer), with any ``AutoModel`` as the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cdlm.errors import CheckpointError, DataError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str], metric: str) -> None:
    if len(hypotheses) != len(references):
        raise DataError(f"{metric}: {len(hypotheses)} hypotheses but {len(references)} references; give one each")
    if not hypotheses:
        raise DataError(f"{metric}: no hypotheses to score")


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Return corpus BLEU (0–100): ``sacrebleu.corpus_bleu(lowercase=True, use_effective_order=True)``."""
    import sacrebleu

    _check_pairs(hypotheses, references, "bleu")
    return float(
        sacrebleu.corpus_bleu(list(hypotheses), [list(references)], lowercase=True, use_effective_order=True).score
    )


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Return the mean ROUGE-1/2/L F-measures × 100 (``rouge-score``, Porter stemmer) by ``rouge1`` … ``rougeL``."""
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references, "rouge")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)  # (target, prediction), as the reference calls it
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure * 100
    return {key: total / len(hypotheses) for key, total in totals.items()}


def mauve_features(
    texts: Sequence[str], encoder: str, *, max_length: int = 1024, batch_size: int = 8, device: str = "cpu"
) -> torch.Tensor:
    """Featurise ``texts`` as ``mauve-text`` does: the final layer's hidden state at each text's last token.

    Each text is truncated to ``max_length`` tokens; batches are padded, and the padding is masked out.

    Args:
        texts: the texts.
        encoder: any ``AutoModel`` hub id or local directory (``mauve-text`` uses ``gpt2-large``).
        max_length: tokens kept per text.
        batch_size: texts per forward.
        device: where to run the encoder.

    Returns:
        (S, H) float32 features.

    Raises:
        CheckpointError: the encoder cannot be loaded.
    """
    from mauve.utils import featurize_tokens_from_model
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(encoder)
        model = AutoModel.from_pretrained(encoder, pad_token_id=tokenizer.eos_token_id).to(device).eval()
    except (OSError, ValueError) as err:  # not found, or not a valid path / hub id
        raise CheckpointError(f"--mauve-encoder {encoder}: cannot load a model and tokenizer there ({err})") from None
    tokens = [tokenizer.encode(t, return_tensors="pt", truncation=True, max_length=max_length) for t in texts]
    with torch.no_grad():
        return featurize_tokens_from_model(model, tokens, batch_size).float()  # (S, H)


def mauve(
    texts: Sequence[str],
    references: Sequence[str],
    *,
    encoder: str = "gpt2-large",
    max_length: int = 1024,
    batch_size: int = 8,
    seed: int = 25,
    device: str = "cpu",
) -> float:
    """Return MAUVE (0–1) between human ``references`` (P) and model ``texts`` (Q), ``mauve-text`` defaults.

    ``num_buckets`` is ``auto`` (one k-means cluster per 10 texts), ``seed`` 25 as in ``compute_mauve``.

    Raises:
        DataError: fewer than two texts on either side.
    """
    import mauve as mauve_text

    if len(texts) < 2 or len(references) < 2:
        raise DataError(f"mauve: needs at least 2 samples and 2 references, got {len(texts)} and {len(references)}")
    p = mauve_features(references, encoder, max_length=max_length, batch_size=batch_size, device=device)
    q = mauve_features(texts, encoder, max_length=max_length, batch_size=batch_size, device=device)
    out = mauve_text.compute_mauve(p_features=p.numpy(), q_features=q.numpy(), seed=seed, verbose=False)
    return float(out.mauve)
