import math
from pathlib import Path

import pytest
import torch

from cdlm.errors import CheckpointError, DataError
from cdlm.eval.gen_ppl import generative_perplexity, judge_tokens, load_judge, token_nlls


def test_token_nlls_by_hand() -> None:
    # vocab 3, eos = 2; row: a b eos eos (pad). Targets b, eos (first: scored), eos (second pad: not scored).
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 2, 2]])
    nll, valid = token_nlls(logits, ids, eos_id=2)
    torch.testing.assert_close(nll[0, :2], torch.tensor([math.log(5 / 3), math.log(3.0)]))
    assert valid.tolist() == [[1, 1, 0]]


def test_zero_judge_perplexity_is_the_vocabulary_size(zero_judge_dir: Path) -> None:
    judge = load_judge(str(zero_judge_dir), dtype="fp32")
    out = generative_perplexity(judge, ["the cat sat", "a dog ran on the log .", "   ", ""], batch_size=3)
    vocab = len(judge.tokenizer)
    assert out.ppl == pytest.approx(vocab, rel=1e-6)  # uniform logits: every scored token costs ln V
    assert out.num_dropped == 2 and len(out.per_sample) == 2
    assert out.tokens[0] == judge.tokenizer.encode("the cat sat")


def test_pooling_padding_and_batching_match_a_per_sample_loop(judge_dir: Path) -> None:
    judge = load_judge(str(judge_dir), dtype="fp32")
    texts = ["the cat sat on the mat .", "a dog", "it was big and red , the log"]
    eos = judge.tokenizer.eos_token_id
    total, count = 0.0, 0
    for text in texts:  # independent: unpadded forward; the first EOS after a shorter text is a target
        ids = judge.tokenizer.encode(text)
        longest = max(len(judge.tokenizer.encode(t)) for t in texts)
        if len(ids) < longest:
            ids = ids + [eos]
        logp = torch.log_softmax(judge.model(torch.tensor([ids])).logits[0].double(), -1)
        total -= sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
        count += len(ids) - 1
    for batch_size in (1, 2, 16):
        out = generative_perplexity(judge, texts, batch_size=batch_size)
        assert out.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_truncation_and_entropy_tokens(judge_dir: Path) -> None:
    judge = load_judge(str(judge_dir), dtype="fp32", with_model=False)
    assert judge.model is None
    assert judge_tokens(judge, ["the cat sat on the mat", "a"], max_length=4) == [
        judge.tokenizer.encode("the cat sat on"),
        judge.tokenizer.encode("a"),
    ]


def test_errors_name_the_judge_and_the_input(tmp_path: Path, judge_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="--judge"):
        load_judge(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="empty"):
        generative_perplexity(load_judge(str(judge_dir), dtype="fp32"), [" ", ""])
    with pytest.raises(DataError, match="none of the 2 samples has a judge token to score"):
        generative_perplexity(load_judge(str(judge_dir), dtype="fp32"), ["cat", "alalal"])  # one word each
