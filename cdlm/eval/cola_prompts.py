"""Prompts of Cola DLM's 8-task generative benchmark (Cola spec §8.2, ``apply_prompt_template``).

A task row is a JSON object with ``id``, ``question``, ``context`` (SQuAD), ``answer`` or ``ground_truth`` and
``choices``. Each task's prompt is its few-shot examples followed by the row in the same layout; the few-shot
strings are the reference's, byte for byte (the benchmark's numbers depend on them). LAMBADA and unknown task
names use the question verbatim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cdlm.errors import DataError

TASKS = ("lambada", "mmlu", "obqa", "hellaswag", "race", "siqa", "squad", "story_cloze")
"""The benchmark's tasks, in ``acc_calc.py``'s order."""


@dataclass(frozen=True)
class Shot:
    """One worked example: its text (question, context or story), choices and answer (and SQuAD's question)."""

    text: str
    choices: tuple[str, ...]
    answer: str
    question: str = ""


@dataclass(frozen=True)
class Layout:
    """How a task lays out one example.

    Attributes:
        lead: label of the first line (``Question``, ``Context``, ``Article``, ``Story``).
        answer: label of the answer line (``Answer`` or ``End``).
        header: text before the first example.
        options: line before the choices (RACE's ``Options:``).
        with_choices: whether choice lines are written (all but SQuAD).
        with_question: SQuAD's ``Question:`` line after the context.
        two_choices: Story Cloze writes exactly two choices, empty ones when the row has none.
        shots: the few-shot examples.
    """

    lead: str
    shots: tuple[Shot, ...]
    answer: str = "Answer"
    header: str = ""
    options: str = ""
    with_choices: bool = True
    with_question: bool = False
    two_choices: bool = False


_NORMANS = (
    "The Normans (Norman: Nourmands; French: Normands; Latin: Normanni) were the people who in the 10th and 11th "
    "centuries gave their name to Normandy, a region in France. They were descended from Norse raiders and pirates "
    "from Denmark, Iceland and Norway."
)

LAYOUTS: dict[str, Layout] = {
    "squad": Layout(
        lead="Context",
        with_choices=False,
        with_question=True,
        shots=(Shot(_NORMANS, (), "France", question="In what country is Normandy located?"),),
    ),
    "obqa": Layout(
        lead="Question",
        shots=(
            Shot(
                "Which tool is best for tightening a screw?",
                ("spoon", "hammer", "screwdriver", "paintbrush"),
                "screwdriver",
            ),
            Shot(
                "What do plants absorb from the air during photosynthesis?",
                ("carbon dioxide", "oxygen", "helium", "salt"),
                "carbon dioxide",
            ),
        ),
    ),
    "hellaswag": Layout(
        lead="Context",
        shots=(
            Shot(
                "The girl puts the bread into the toaster and pushes the lever down. The bread",
                (
                    "becomes a slice of pizza.",
                    "starts to toast and turn brown.",
                    "disappears immediately.",
                    "turns into a glass of water.",
                ),
                "starts to toast and turn brown.",
            ),
            Shot(
                "The goalkeeper sees the ball coming towards the net. He dives and",
                (
                    "catches the ball with his hands.",
                    "starts dancing in the field.",
                    "opens a laptop to check email.",
                    "runs away from the stadium.",
                ),
                "catches the ball with his hands.",
            ),
        ),
    ),
    "mmlu": Layout(
        lead="Question",
        shots=(
            Shot(
                "Which gas do plants absorb from the air during photosynthesis?",
                ("Oxygen", "Carbon dioxide", "Nitrogen", "Hydrogen"),
                "Carbon dioxide",
            ),
            Shot(
                "A triangle has angles 50 degrees and 60 degrees. What is the third angle?",
                ("60 degrees", "70 degrees", "80 degrees", "90 degrees"),
                "70 degrees",
            ),
        ),
    ),
    "race": Layout(
        lead="Article",
        header="Read the following article and answer the question.\n\n",
        options="Options:\n",
        shots=(
            Shot(
                "Mary went to the store to buy some fruits. She bought five apples and two oranges. She paid 5 "
                "dollars in total. What did Mary buy?",
                ("Bananas", "Apples and oranges", "Grapes", "Watermelon"),
                "Apples and oranges",
            ),
        ),
    ),
    "siqa": Layout(
        lead="Question",
        shots=(
            Shot(
                "Jordan wanted to tell a joke to his friends. What does Jordan need to do before this?",
                ("ignore his friends", "think of a funny story", "leave the room"),
                "think of a funny story",
            ),
            Shot(
                "Kai helped his neighbor carry heavy groceries inside. How would the neighbor feel?",
                ("angry", "grateful", "scared"),
                "grateful",
            ),
        ),
    ),
    "story_cloze": Layout(
        lead="Story",
        answer="End",
        two_choices=True,
        shots=(
            Shot(
                "I wanted to make an omelet. I cracked two eggs into a bowl and whisked them. Then I poured them "
                "into a hot pan.",
                ("I ate a delicious omelet for breakfast.", "I decided to order a pizza instead."),
                "I ate a delicious omelet for breakfast.",
            ),
            Shot(
                "The runner tied his shoes tight. He sprinted as fast as he could during the race. He crossed the "
                "finish line first.",
                ("He was sad that he lost the race.", "He won the gold medal."),
                "He won the gold medal.",
            ),
        ),
    ),
}


def _block(layout: Layout, text: str, choices: Sequence[str], question: str, answer: str | None) -> str:
    """Lay out one example; ``answer`` None ends at the answer label, for the model to complete."""
    out = f"{layout.lead}: {text}\n"
    if layout.with_question:
        out += f"Question: {question}\n"
    if layout.with_choices:
        lines = "\n".join(f"({chr(65 + i)}) {choice}" for i, choice in enumerate(choices))
        out += f"{layout.options}{lines}\n"
    return out + f"{layout.answer}:" + ("" if answer is None else f" {answer}\n\n")


def _choices(task: str, layout: Layout, row: Mapping[str, Any]) -> list[str]:
    choices = list(row.get("choices") or [])
    if layout.two_choices:
        if not choices:
            return ["", ""]  # parity: inference.py writes two empty options for a row without choices
        if len(choices) < 2:
            raise DataError(f"{task} row {row.get('id')!r}: 'choices' needs 2 entries, got {choices!r}")
        return choices[:2]
    return choices


def prompt(task: str, row: Mapping[str, Any]) -> str:
    """Return the benchmark prompt of one task row (``apply_prompt_template`` of the reference's inference.py).

    Args:
        task: one of :data:`TASKS`; any other name (e.g. ``lambada``) uses the question verbatim.
        row: the task row (``question``, ``context``, ``choices``).
    """
    layout = LAYOUTS.get(task)
    question = str(row.get("question", ""))
    if layout is None:
        return question
    shots = "".join(_block(layout, s.text, s.choices, s.question, s.answer) for s in layout.shots)
    # SQuAD's row: the context leads and the question follows; every other task leads with the question.
    text = str(row.get("context", "")) if layout.with_question else question
    return layout.header + shots + _block(layout, text, _choices(task, layout, row), question, None)


def ground_truth(row: Mapping[str, Any]) -> str:
    """Return a task row's answer as the reference's output records it (``answer`` first, else ``ground_truth``)."""
    return str(row.get("answer", row.get("ground_truth", "")))
