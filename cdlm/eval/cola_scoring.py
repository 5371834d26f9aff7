r"""Scoring of Cola DLM's 8-task generative benchmark (Cola spec §11.2, ``scripts/acc_calc.py``).

A generation record is ``{"id", "prompt", "generate", "ground_truth", "choices"?}`` (what the reference's
inference writes). Scoring, as the reference does it:

* ``generate`` is cut at the first newline whose preceding text holds a word character;
* ``normalize`` lowercases, strips, drops ``[^\w\s]`` and collapses whitespace;
* LAMBADA: the first normalised words agree;
* MMLU, OBQA, RACE, SIQA: the choice letters extracted from the generation and from the answer agree, or the
  normalised texts are equal;
* HellaSwag, SQuAD, Story Cloze and any other task: the normalised texts are equal
  (``difflib.SequenceMatcher(...).ratio() >= 1.0``).

Accuracy is 100 · correct / total and the benchmark average is the mean over the tasks scored.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LETTER_TASKS = ("mmlu", "obqa", "race", "siqa")
"""Tasks scored by the extracted choice letter."""

_WORD = re.compile(r"\w")
_ANSWER_TAIL = re.compile(r"(?i)\b(?:final\s+answer|answer)\b\s*(?:is|=|:|：)?\s*(.+)$")
_BARE_LETTER = re.compile(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?\.?")
_KEYWORD_LETTER = re.compile(
    r"(?i)\b(?:final\s+answer|answer|option|choice)\b\s*(?:is|=|:|：)?\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?(?=\s|$|[.,;:!?])"
)
_BRACKET_LETTER = re.compile(r"[\(\[]\s*([A-Za-z])\s*[\)\]]")
_ANSWER_PREFIX = re.compile(r"(?i)^(the\s+)?(correct\s+)?(final\s+)?(answer|option|choice)\b\s*(is|=|:|：)?\s*")
_BRACKETS_ONLY_MAX_CHARS = 40  # a bracketed letter counts only in a short text
_FUZZY_MIN_RATIO = 0.9


def first_line(generation: str) -> str:
    """Cut a generation at the first newline whose preceding text contains a word character."""
    start = 0
    while (cut := generation.find("\n", start)) != -1:
        if _WORD.search(generation[:cut]):
            return generation[:cut]
        start = cut + 1
    return generation


def normalize(text: Any) -> str:
    r"""Lowercase, strip, drop punctuation (``[^\w\s]``) and collapse whitespace; None becomes ``""``."""
    if text is None:
        return ""
    return " ".join(re.sub(r"[^\w\s]", "", str(text).lower().strip()).split())


def similarity(a: Any, b: Any) -> float:
    """Return difflib's ratio of the normalised texts (1.0 when both are empty)."""
    na, nb = normalize(a), normalize(b)
    if not na and not nb:
        return 1.0
    return difflib.SequenceMatcher(None, na, nb).ratio()


def _first_word(text: Any) -> str:
    words = normalize(text).split()
    return words[0] if words else ""


def answer_segment(text: Any) -> str:
    """Return the text after ``answer``/``final answer`` (is, =, :) on the last line that has one, else all of it."""
    raw = "" if text is None else str(text).strip()
    for line in reversed([s.strip() for s in raw.splitlines() if s.strip()]):
        match = _ANSWER_TAIL.search(line)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return raw


def letter_in_text(text: Any, num_choices: int) -> str:
    """Return the choice letter a text states, or ``""``.

    Tried in order, each giving one candidate that must name one of the ``num_choices`` choices: the whole text
    is a bare letter (``A``, ``(A)``, ``[A]``, ``A.``); the last ``answer|final answer|option|choice … X``; in a
    text of at most 40 characters, the last ``(X)`` or ``[X]``.
    """
    raw = "" if text is None else str(text).strip()
    if not raw:
        return ""
    bare = _BARE_LETTER.fullmatch(raw)
    keyword = _KEYWORD_LETTER.findall(raw)
    bracket = _BRACKET_LETTER.findall(raw) if len(raw) <= _BRACKETS_ONLY_MAX_CHARS else []
    for candidate in (bare.group(1) if bare else "", keyword[-1] if keyword else "", bracket[-1] if bracket else ""):
        if candidate and ord(candidate.upper()) - 65 < num_choices:
            return candidate.upper()
    return ""


def letter_of_choice_text(text: Any, choices: Sequence[Any]) -> str:
    """Return the letter of the choice a text repeats, or ``""``.

    In order: a choice equal to the normalised text; one equal to it once an "the correct answer is"-style
    prefix is stripped; the only choice contained in it; the most similar choice if its ratio is at least 0.9.
    """
    if text is None or not choices:
        return ""
    norm_text = normalize(text)
    if not norm_text:
        return ""
    norm_choices = [normalize(c) for c in choices]
    if norm_text in norm_choices:
        return chr(65 + norm_choices.index(norm_text))
    cleaned = _ANSWER_PREFIX.sub("", str(text), count=1).strip()
    norm_cleaned = normalize(cleaned)
    if not norm_cleaned:
        return ""
    if norm_cleaned in norm_choices:
        return chr(65 + norm_choices.index(norm_cleaned))
    contained = [i for i, c in enumerate(norm_choices) if c and c in norm_cleaned]
    if len(contained) == 1:
        return chr(65 + contained[0])
    best, best_ratio = -1, 0.0
    for i, choice in enumerate(choices):
        ratio = similarity(cleaned, choice)
        if ratio > best_ratio:  # the first of equally similar choices wins
            best, best_ratio = i, ratio
    return chr(65 + best) if best >= 0 and best_ratio >= _FUZZY_MIN_RATIO else ""


def predicted_letter(generation: Any, choices: Sequence[Any]) -> str:
    """Return the letter a generation picks: from its answer segment first, then from the whole text."""
    num_choices = min(len(choices), 26)
    if num_choices == 0:
        return ""
    for candidate in (answer_segment(generation), generation):
        letter = letter_in_text(candidate, num_choices) or letter_of_choice_text(candidate, choices)
        if letter:
            return letter
    return ""


def reference_letter(answer: Any, choices: Sequence[Any]) -> str:
    """Return the letter an answer names (a letter, or the text of a choice), or ``""``."""
    num_choices = min(len(choices), 26)
    if num_choices == 0:
        return ""
    return letter_in_text(answer, num_choices) or letter_of_choice_text(answer, choices)


def is_correct(task: str, record: Mapping[str, Any]) -> bool:
    """Score one generation record of ``task`` (its ``generate`` is cut at its first line first)."""
    raw = record.get("generate")
    generation = "" if raw is None else first_line(raw) if isinstance(raw, str) else str(raw)
    answer = record.get("ground_truth", record.get("answer", ""))
    if task == "lambada":
        return _first_word(generation) == _first_word(answer)
    if task in LETTER_TASKS:
        choices = record.get("choices") or []
        letter = predicted_letter(generation, choices)
        if letter and letter == reference_letter(answer, choices):
            return True
    return similarity(generation, answer) >= 1.0


@dataclass(frozen=True)
class TaskScore:
    """One task's result: ``correct`` of ``total`` records, and the accuracy in percent."""

    task: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        """100 · correct / total (NaN for no records)."""
        return 100.0 * self.correct / self.total if self.total else float("nan")


def score_task(task: str, records: Iterable[Mapping[str, Any]]) -> TaskScore:
    """Score every generation record of one task."""
    verdicts = [is_correct(task, r) for r in records]
    return TaskScore(task=task, correct=sum(verdicts), total=len(verdicts))


def benchmark_average(scores: Iterable[TaskScore]) -> float:
    """Return the mean accuracy over the tasks scored (``tasks_average`` of ``accuracy_summary.csv``)."""
    accuracies = [s.accuracy for s in scores if s.total]
    return sum(accuracies) / len(accuracies) if accuracies else float("nan")
