import pytest

from cdlm.eval.cola_scoring import (
    answer_segment,
    benchmark_average,
    first_line,
    is_correct,
    letter_in_text,
    letter_of_choice_text,
    normalize,
    predicted_letter,
    score_task,
)

CHOICES = ["Oxygen", "Carbon dioxide", "Nitrogen", "Hydrogen"]


def test_first_line_skips_leading_blank_lines() -> None:
    assert first_line("\n\n Paris\nQuestion: next") == "\n\n Paris"
    assert first_line(" no newline") == " no newline"
    assert first_line("\n\n") == "\n\n"


def test_normalize() -> None:
    assert normalize("  The  Cat, sat!\n") == "the cat sat"
    assert normalize(None) == ""


def test_answer_segment_takes_the_last_answer_line() -> None:
    assert answer_segment("I think.\nAnswer: (B)\nfinal answer is C") == "C"
    assert answer_segment("no keyword") == "no keyword"


def test_letter_rules_in_order() -> None:
    assert letter_in_text("(b)", 4) == "B"
    assert letter_in_text("E", 4) == ""  # out of range
    assert letter_in_text("the answer is (C) for sure", 4) == "C"
    assert letter_in_text("short (D) one", 4) == "D"
    assert letter_in_text("a long text that is more than forty characters (D)", 4) == ""


def test_letter_of_choice_text() -> None:
    assert letter_of_choice_text(" carbon dioxide.", CHOICES) == "B"
    assert letter_of_choice_text("The correct answer is nitrogen", CHOICES) == "C"
    assert letter_of_choice_text("it is hydrogen gas", CHOICES) == "D"  # the only choice contained
    assert letter_of_choice_text("Hydrogenn", CHOICES) == "D"  # difflib ratio 16/17 ≥ 0.9
    assert letter_of_choice_text("Hydrogne", CHOICES) == ""  # 14/16 = 0.875 < 0.9
    assert letter_of_choice_text("something else", CHOICES) == ""


def test_predicted_letter_and_record_scoring() -> None:
    assert predicted_letter(" Carbon dioxide\n\nQuestion: x", CHOICES) == "B"
    record = {"generate": " Carbon dioxide\nQuestion: next", "ground_truth": "Carbon dioxide", "choices": CHOICES}
    assert is_correct("mmlu", record)
    assert not is_correct("mmlu", {**record, "generate": " Oxygen"})
    assert is_correct("lambada", {"generate": " Signs, of course", "ground_truth": "signs"})
    assert is_correct("squad", {"generate": " France.\nContext: ...", "ground_truth": "france"})
    assert not is_correct("squad", {"generate": " France is", "ground_truth": "France"})


def test_accuracy_and_average() -> None:
    a = score_task("squad", [{"generate": "x", "ground_truth": "x"}, {"generate": "y", "ground_truth": "x"}])
    b = score_task("lambada", [{"generate": "x", "ground_truth": "x"}])
    assert (a.accuracy, b.accuracy) == (50.0, 100.0)
    assert benchmark_average([a, b]) == pytest.approx(75.0)
