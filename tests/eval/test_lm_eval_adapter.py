"""The lm-eval `cdlm` model runs a generate_until task offline (a task file and data made here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdlm.eval.lm_eval_adapter import cut_at

TASK = """task: cdlm_tiny
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{source}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""


def test_cut_at_the_first_stop_string() -> None:
    assert cut_at("abc\ndef. g", ["\n", "."]) == "abc"
    assert cut_at("abc", ["x", ""]) == "abc"


def test_generate_until_task_runs_offline(seq2seq_run: Path, tmp_path: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": "x"}) + "\n" for s in ("assert", "import", "class")))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "cdlm_tiny.yaml").write_text(TASK.format(data=data))
    out = lm_eval.simple_evaluate(
        model="cdlm",
        model_args=f"checkpoint={seq2seq_run},steps=2",
        tasks=["cdlm_tiny"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
    )
    assert out["results"]["cdlm_tiny"]["exact_match,none"] == pytest.approx(0.0)
    generations = [s["resps"][0][0] for s in out["samples"]["cdlm_tiny"]]
    assert len(generations) == 3 and all(isinstance(g, str) and "\n" not in g for g in generations)
