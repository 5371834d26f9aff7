import pytest

from cdlm.errors import DataError
from cdlm.eval.cola_prompts import TASKS, ground_truth, prompt


def test_lambada_is_the_question_verbatim() -> None:
    assert prompt("lambada", {"question": "He opened the"}) == "He opened the"
    assert prompt("openai", {"question": "x"}) == "x"


def test_choice_task_layout() -> None:
    text = prompt("siqa", {"question": "Why?", "choices": ["a", "b"]})
    assert text.startswith("Question: Jordan wanted to tell a joke to his friends.")
    assert text.endswith("Answer: grateful\n\nQuestion: Why?\n(A) a\n(B) b\nAnswer:")
    assert prompt("obqa", {"question": "Q", "choices": []}).endswith("Question: Q\n\nAnswer:")


def test_race_squad_and_story_cloze_layouts() -> None:
    race = prompt("race", {"question": "Text.", "choices": ["x", "y"]})
    assert race.startswith("Read the following article and answer the question.\n\nArticle: Mary went")
    assert race.endswith("Answer: Apples and oranges\n\nArticle: Text.\nOptions:\n(A) x\n(B) y\nAnswer:")
    squad = prompt("squad", {"context": "C.", "question": "Q?"})
    assert squad.endswith("Answer: France\n\nContext: C.\nQuestion: Q?\nAnswer:")
    story = prompt("story_cloze", {"question": "S.", "choices": ["e1", "e2", "e3"]})
    assert story.endswith("End: He won the gold medal.\n\nStory: S.\n(A) e1\n(B) e2\nEnd:")
    assert prompt("story_cloze", {"question": "S."}).endswith("Story: S.\n(A) \n(B) \nEnd:")
    with pytest.raises(DataError, match="'choices' needs 2"):
        prompt("story_cloze", {"question": "S.", "choices": ["only"]})


def test_every_task_has_a_prompt_and_answer_order() -> None:
    assert len(TASKS) == 8
    assert all(prompt(t, {"question": "q", "choices": ["a", "b"]}) for t in TASKS)
    assert ground_truth({"answer": "a", "ground_truth": "b"}) == "a"
    assert ground_truth({"ground_truth": "b"}) == "b"
