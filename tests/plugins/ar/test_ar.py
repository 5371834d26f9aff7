"""The autoregressive baseline: it learns, samples like the model it wraps, and becomes a judge for cdlm eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import cdlm
from cdlm.eval.gen_ppl import generative_perplexity, load_judge
from cdlm.interfaces import GenerateRequest
from cdlm_ar import lm

TINY = [
    "model.hidden_size=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.max_length=64",
    "data.seq_len=64",
    "data.max_rows=400",
    "data.vocab_size=512",  # the recipe's 4096 tokens need more text than 400 rows
    "model.vocab_size=512",
    "train.steps=40",
    "train.batch_size=8",
    "train.log_every=10",
    "train.save_every=40",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ar") / "run"
    cdlm.train(cdlm.load_recipe("ar-tiny", TINY), out)
    return out


def test_training_lowers_the_loss(run: Path) -> None:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 0.5


def test_batched_prompts_of_different_lengths_match_one_by_one(run: Path) -> None:
    """Left padding, positions and the KV cache: a greedy batch equals each prompt sampled alone."""
    overrides = ["sample.temperature=0", "sample.max_new_tokens=12", "sample.repetition_penalty=1.3"]
    loaded = cdlm.load_pretrained(run, overrides=overrides)  # the penalty's history must not see the padding
    settings = loaded.config.sample
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    together = loaded.method.pipeline(GenerateRequest(3, prompts, settings), torch.Generator())
    alone = [loaded.method.pipeline(GenerateRequest(1, [p], settings), torch.Generator()).ids[0] for p in prompts]
    assert together.ids == alone
    assert all(len(row) == 12 for row in together.ids)


def test_sampling_is_seeded_by_the_generator(run: Path) -> None:
    loaded = cdlm.load_pretrained(run, overrides=["sample.temperature=1"])
    settings = loaded.config.sample
    draw = [
        loaded.method.pipeline(GenerateRequest(4, None, settings), torch.Generator().manual_seed(s)).ids
        for s in (0, 0, 1)
    ]
    assert draw[0] == draw[1] != draw[2]


def test_converted_judge_scores_like_the_trained_model(run: Path, tmp_path: Path) -> None:
    """``cdlm convert --to hf-causal-lm`` gives a plain transformers model: the same logits, usable as a judge."""
    judge_dir = cdlm.convert(run, tmp_path / "judge", to="hf-causal-lm")
    hf = AutoModelForCausalLM.from_pretrained(str(judge_dir)).eval()
    loaded = cdlm.load_pretrained(run)
    ours = loaded.method.trainable["lm"].eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
    judge = load_judge(str(judge_dir), dtype="fp32")
    real = generative_perplexity(judge, ["The function returns the value of the object in the module."] * 2)
    soup = generative_perplexity(judge, ["object value the returns in of function The module. the the"] * 2)
    assert real.ppl < soup.ppl
    back = cdlm.load_pretrained(judge_dir)  # the judge directory samples with cdlm too
    assert back.config.method == "ar"


def test_context_too_long_is_refused() -> None:
    with pytest.raises(cdlm.CdlmError, match=r"data.seq_len=256: data.seq_len: 256 exceeds model.max_length 128"):
        cdlm.load_recipe("ar-tiny", ["data.seq_len=256"])


def test_a_judge_with_its_own_pad_id_never_scores_padding(run: Path, tmp_path: Path) -> None:
    """cdlm's BPE has <pad> 0 and </s> 1: a shorter text is scored on its tokens and one EOS, as if alone.

    (The longest text has no padding, so, as in the reference, its end is not scored.)
    """
    judge = load_judge(str(cdlm.convert(run, tmp_path / "judge", to="hf-causal-lm")), dtype="fp32")
    texts = ["The value of the object.", "A list of the functions in the module, and the values they return."]
    total, count = 0.0, 0
    for text, end in zip(texts, ([judge.tokenizer.eos_token_id], []), strict=True):
        ids = torch.tensor([[*judge.tokenizer(text)["input_ids"], *end]])
        with torch.no_grad():
            logp = judge.model(ids).logits.log_softmax(-1)[0, :-1]  # (T - 1, V)
        total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert generative_perplexity(judge, texts).ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_texts_longer_than_the_judge_context_are_scored_in_chunks(run: Path, tmp_path: Path) -> None:
    judge = load_judge(str(cdlm.convert(run, tmp_path / "judge", to="hf-causal-lm")), dtype="fp32")
    context = judge.model.config.n_positions
    long_text = " ".join(["the value of the object in the module"] * context)  # > context judge tokens
    assert len(judge.tokenizer(long_text)["input_ids"]) > context
    assert math.isfinite(generative_perplexity(judge, [long_text]).ppl)


def test_the_repetition_penalty_sees_each_prompt_and_not_the_padding(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = cdlm.load_pretrained(run, overrides=["sample.temperature=0", "sample.max_new_tokens=2"])
    seen: list[torch.Tensor] = []
    real = lm.select_tokens

    def recording(logits: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append(kwargs["previous_ids"])  # type: ignore[arg-type]
        return real(logits, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lm, "select_tokens", recording)
    prompts = [[5, 6, 7, 8], [12]]
    loaded.method.pipeline(GenerateRequest(2, prompts, loaded.config.sample), torch.Generator())
    pad = loaded.config.model.pad_id
    assert [[t for t in row if t != pad] for row in seen[0].tolist()] == prompts  # no leading EOS, no padding
    assert all(pad in row for row in seen[0].tolist())  # every row alike, whatever the others' lengths
