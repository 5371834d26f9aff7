import pytest
import torch

from cdlm.sampling.tokens import greedy_linear, select_tokens


def test_greedy_ties_take_the_first_index() -> None:
    logits = torch.tensor([[[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]]])
    assert select_tokens(logits).tolist() == [[1, 0]]
    assert select_tokens(logits, temperature=9e-6).tolist() == [[1, 0]]


def test_input_logits_are_not_modified() -> None:
    logits = torch.tensor([[[1.0, -2.0, 3.0]]])
    select_tokens(logits, repetition_penalty=2.0, previous_ids=torch.tensor([[0, 1, 2]]))
    assert logits.tolist() == [[[1.0, -2.0, 3.0]]]


def test_repetition_penalty_sign_rule_applies_when_greedy_at_every_position() -> None:
    # id 0 (positive, seen) is divided by 4 → 0.5; id 1 (negative, seen) is multiplied → −4; id 2 unseen.
    logits = torch.tensor([[[2.0, -1.0, 1.0], [2.0, -1.0, 1.0]], [[2.0, -1.0, 1.0], [2.0, -1.0, 1.0]]])
    previous = torch.tensor([[0, 1], [2, 2]])
    assert select_tokens(logits, repetition_penalty=4.0, previous_ids=previous).tolist() == [[2, 2], [0, 0]]
    # the negative seen logit becomes more negative: with id 0 and 2 masked out, id 1 would still lose to them
    neg = torch.tensor([[[-1.0, -2.0, -1.5]]])
    assert select_tokens(neg, repetition_penalty=2.0, previous_ids=torch.tensor([[0]])).tolist() == [[2]]
    assert select_tokens(neg, repetition_penalty=1.0, previous_ids=torch.tensor([[0]])).tolist() == [[0]]


def test_non_finite_logits_are_cleaned() -> None:
    logits = torch.tensor([[[float("nan"), -1.0, float("inf")], [float("nan"), -1.0, float("-inf")]]])
    assert select_tokens(logits).tolist() == [[2, 0]]


def _frequencies(logits: torch.Tensor, draws: int = 4000, temperature: float = 1.0, **kwargs: float) -> torch.Tensor:
    rows = logits.expand(1, draws, logits.shape[-1])
    ids = select_tokens(rows, temperature=temperature, generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.bincount(ids.flatten(), minlength=logits.shape[-1]).float() / draws


def test_top_k_keeps_ties() -> None:
    logits = torch.tensor([[[5.0, 4.0, 4.0, 1.0, 0.0]]])
    freq = _frequencies(logits, top_k=2)
    assert freq[1] > 0 and freq[2] > 0 and freq[0] > 0 and freq[3] == 0 and freq[4] == 0


def test_top_p_keeps_the_first_token_and_the_crossing_one() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None, None]
    assert _frequencies(logits, top_p=0.5)[1:].sum() == 0  # 0.6 > 0.5 already: only the first
    freq = _frequencies(logits, top_p=0.7)  # 0.6 ≤ 0.7 < 0.9: the first two
    assert freq[0] > 0 and freq[1] > 0 and freq[2] == 0
    torch.testing.assert_close(freq[:2], torch.tensor([2 / 3, 1 / 3]), atol=0.03, rtol=0)


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[[1.0, 0.0]]])
    hot, cold = _frequencies(logits)[0], _frequencies(logits, temperature=0.25)[0]
    assert abs(hot - torch.sigmoid(torch.tensor(1.0))) < 0.03 and cold > 0.97


def test_seeded_multinomial_is_reproducible() -> None:
    logits = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    a = select_tokens(logits, temperature=0.9, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = select_tokens(logits, temperature=0.9, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = select_tokens(logits, temperature=0.9, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (2, 8) and a.dtype == torch.int64


@pytest.mark.parametrize(
    ("logits", "kwargs", "message"),
    [
        (torch.zeros(2, 3), {}, r"expected logits \(B, L, V\)"),
        (
            torch.zeros(2, 1, 3),
            {"repetition_penalty": 1.1, "previous_ids": torch.zeros(3, 1, dtype=torch.long)},
            r"previous_ids must be \(B=2, P\)",
        ),
        (torch.zeros(2, 1, 3), {"temperature": 1.0}, "needs generator"),
    ],
)
def test_bad_arguments(logits: torch.Tensor, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_tokens(logits, **kwargs)


@pytest.mark.parametrize("with_bias", [True, False])
def test_greedy_linear_matches_the_argmax_of_full_logits(with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    weight = 0.05 * torch.randn(3000, 64, generator=gen)
    weight[7] = weight[11]  # an exact tie: the first index wins, as in select_tokens
    bias = 0.1 * torch.randn(3000, generator=gen) if with_bias else None
    if bias is not None:
        bias[7] = bias[11]
    features = torch.nn.functional.gelu(torch.randn(4, 33, 64, generator=gen))
    features[0, 0] = 10 * weight[11]  # steer one row onto the tie
    full = select_tokens(torch.nn.functional.linear(features, weight, bias))
    for screen in (True, False):
        ids = greedy_linear(features, weight, bias, screen=screen)
        assert ids.shape == (4, 33) and torch.equal(ids, full)
    assert ids[0, 0] == 7


def test_greedy_linear_falls_back_on_non_finite_features() -> None:
    weight = torch.randn(50, 8, generator=torch.Generator().manual_seed(6))
    features = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(7))
    features[0, 1, 2] = float("nan")
    expected = select_tokens(torch.nn.functional.linear(features, weight))
    assert torch.equal(greedy_linear(features, weight), expected)
