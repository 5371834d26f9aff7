import math
from pathlib import Path

import pytest
import torch

from cdlm.errors import DataError
from cdlm.eval.text_metrics import bleu, mauve, mauve_features, rouge


def test_bleu_by_hand() -> None:
    assert bleu(["The cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)  # lowercase=True
    # "the cat" vs "the cat sat": effective order 2, precisions 2/2 and 1/1; brevity penalty exp(1 - 3/2)
    assert bleu(["the cat"], ["the cat sat"]) == pytest.approx(100 * math.exp(-0.5), abs=1e-3)


def test_rouge_by_hand() -> None:
    out = rouge(["the cat sat", "dogs running"], ["the cat ran", "a dog runs"])
    # pair 1: unigrams 2/3 each way, bigrams 1/2, LCS 2; pair 2 (Porter stems dog, run): 2 of 2 vs 2 of 3 → F 0.8,
    # bigram "dog run" absent from "a dog run"? present → 1/1 and 1/2 → F 2/3; LCS 2 → 0.8
    assert out["rouge1"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)
    assert out["rouge2"] == pytest.approx(100 * (0.5 + 2 / 3) / 2)
    assert out["rougeL"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)


def test_pairs_are_checked() -> None:
    with pytest.raises(DataError, match="bleu: 2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])


def test_mauve_is_one_for_identical_sets_and_lower_otherwise(judge_dir: Path) -> None:
    same = ["the cat sat on the mat .", "a dog ran", "it was big", "the log is red", "blue and small"] * 4
    other = ["mat mat mat", "dog dog", "red red red red", ". . .", "of of"] * 4
    assert mauve(same, same, encoder=str(judge_dir)) == pytest.approx(1.0)
    assert mauve(other, same, encoder=str(judge_dir)) < 0.99


def test_mauve_features_are_the_last_token_state(judge_dir: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    texts = ["the cat sat on the mat", "a dog"]
    feats = mauve_features(texts, str(judge_dir), batch_size=2)  # padded together: padding must not leak in
    model, tok = AutoModel.from_pretrained(judge_dir), AutoTokenizer.from_pretrained(judge_dir)
    for i, text in enumerate(texts):
        ids = torch.tensor([tok.encode(text)])
        torch.testing.assert_close(feats[i], model(ids).last_hidden_state[0, -1], atol=1e-5, rtol=1e-5)
