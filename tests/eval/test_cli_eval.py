"""`cdlm eval` end to end on tiny models trained here: unconditional sweep, conditional BLEU/ROUGE, Cola tasks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdlm.cli.__main__ import app
from cdlm.errors import DataError, RecipeError


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(app, ["eval", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = Path(args[args.index("-o") + 1])
    return json.loads((out / "metrics.json").read_text())


def test_unconditional_sweep_is_recorded_and_deterministic(elf_run: Path, judge_dir: Path, tmp_path: Path) -> None:
    # T = 1: the 2-step model's greedy tokens repeat one BPE piece, a single word for the word-level judge
    common = ["-c", str(elf_run), "--judge", str(judge_dir), "--judge-dtype", "fp32", "--num-samples", "3"]
    common += ["--set", "sample.temperature=1.0"]
    first = invoke(*common, "--steps", "2,4", "-o", str(tmp_path / "a"))
    again = invoke(*common, "--steps", "2,4", "-o", str(tmp_path / "b"))
    assert [r["metrics"] for r in first["results"]] == [r["metrics"] for r in again["results"]]
    assert [r["steps"] for r in first["results"]] == [2, 4]
    # the word-level judge reads the BPE soup as mostly [UNK]: entropy near 0, never below −1e-10 (ln(p + 1e-10))
    assert all(
        r["nfe"] > 0 and r["metrics"]["gen_ppl"] > 1 and r["metrics"]["entropy"] > -1e-6 for r in first["results"]
    )
    assert first["model"]["weights_sha256"] == again["model"]["weights_sha256"]
    assert first["judge"]["weights_sha256"] and first["judge"]["dtype"] == "fp32"
    assert first["packages"]["sacrebleu"] and first["seed"] == 0 and first["sampler"]["sampler"] == "sde"
    with (tmp_path / "a" / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["steps"] for r in rows] == ["2", "4"] and set(rows[0]) == {
        "steps",
        "nfe",
        "gen_ppl",
        "entropy",
        "seconds",
    }
    assert (tmp_path / "a" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "a" / "samples.jsonl").read_text().splitlines()) == 6

    lines = (tmp_path / "a" / "samples.jsonl").read_text().splitlines()
    two_steps = tmp_path / "two_steps.jsonl"  # the file holds both step counts; rescore the first one's samples
    two_steps.write_text("".join(line + "\n" for line in lines if json.loads(line)["steps"] == 2))
    scored = invoke(
        "--samples",
        str(two_steps),
        "--judge",
        str(judge_dir),
        "--judge-dtype",
        "fp32",
        "--metrics",
        "entropy",
        "-o",
        str(tmp_path / "c"),
    )
    assert scored["results"][0]["metrics"]["entropy"] == first["results"][0]["metrics"]["entropy"]
    assert "model" not in scored


def test_conditional_elf_is_scored_with_bleu_and_rouge(seq2seq_run: Path, tmp_path: Path) -> None:
    rows = [{"source": "assert", "target": "The assert statement"}, {"source": "import", "target": "Import a module"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = invoke(
        "-c", str(seq2seq_run), "--input", str(tmp_path / "in.jsonl"), "--steps", "4", "-o", str(tmp_path / "o")
    )
    metrics = out["results"][0]["metrics"]
    assert set(metrics) == {"bleu", "rouge1", "rouge2", "rougeL"}
    assert all(0 <= v <= 100 for v in metrics.values())
    assert out["sampler"]["guidance"] == 2.0 and out["sampler"]["sampler"] == "euler"
    samples = [json.loads(line) for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["assert", "import"] and samples[0]["target"] == rows[0]["target"]


def test_cola_task_generation_and_scoring(seq2seq_run: Path, tmp_path: Path) -> None:
    rows = [{"id": 3, "question": "The return", "answer": "value"}, {"id": 5, "question": "An object", "answer": "x"}]
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = invoke(
        "-c",
        str(seq2seq_run),
        "--task",
        "lambada",
        "--input",
        str(tmp_path / "lambada.jsonl"),
        "--steps",
        "2",
        "-o",
        str(tmp_path / "t"),
    )
    assert out["results"][0]["metrics"]["total"] == 2
    records = [json.loads(line) for line in (tmp_path / "t" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [3, 5] and records[0]["ground_truth"] == "value"

    generations = [{"generate": " signs\nmore", "ground_truth": "signs"}, {"generate": " no", "ground_truth": "yes"}]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generations))
    out = invoke("--task", "lambada", "--samples", str(tmp_path / "gen.jsonl"), "-o", str(tmp_path / "s"))
    assert out["results"][0]["metrics"] == {"accuracy": 50.0, "correct": 1, "total": 2}


def test_bad_combinations_name_the_flags(tmp_path: Path) -> None:
    for args, message in (
        ([], "exactly one of --checkpoint"),
        (["--samples", "x.jsonl", "--steps", "2"], "--steps"),
        (["--samples", "x.jsonl", "--task", "nope"], "--task nope"),
        (["--samples", "x.jsonl", "--metrics", "bleu,accuracy"], "do not apply"),
        (["--samples", "x.jsonl", "--metrics", "mauve"], "--references"),
        (["--samples", str(tmp_path / "missing.jsonl"), "--metrics", "entropy"], "no such file"),
    ):
        with pytest.raises(DataError, match=message):
            CliRunner().invoke(app, ["eval", *args, "-o", str(tmp_path)], catch_exceptions=False)


def test_cdlm_sample_takes_sources_and_an_input_file(seq2seq_run: Path, tmp_path: Path) -> None:
    rows = [{"id": 4, "source": "assert", "target": "The assert statement"}, {"source": "import"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["sample", "-c", str(seq2seq_run), "--steps", "2"]
    by_file = CliRunner().invoke(app, [*common, "--input", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "a.jsonl")])
    assert by_file.exit_code == 0, by_file.output
    by_flag = CliRunner().invoke(app, [*common, "--source", "assert", "--source", "import", "-o", str(tmp_path / "b")])
    assert by_flag.exit_code == 0, by_flag.output
    a = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b").read_text().splitlines()]
    assert [r["prompt"] for r in a] == ["assert", "import"] and [r.get("id") for r in a] == [4, None]
    assert [r["ids"] for r in a] == [r["ids"] for r in b]  # ELF seeds from sample.seed: ids do not change its noise


def test_sampling_flags_apply_to_the_loaded_methods_settings(elf_run: Path, tmp_path: Path) -> None:
    """The model loads with the non-sample overrides; its config is shown to the hooks; then `sample.*` applies."""
    from cdlm.eval import runner

    class Loaded(Exception):
        pass

    def stop(config: object) -> None:
        raise Loaded(config)

    opts = runner.EvalOptions(output_dir=tmp_path, checkpoint=str(elf_run), overrides=("sample.max_new_tokens=3",))
    with pytest.raises(Loaded) as loaded:  # ELF has no max_new_tokens: the hook runs before it is refused
        runner.evaluate(opts, runner.Hooks(on_loaded=stop))
    assert type(loaded.value.args[0].sample).__name__ == "ElfSampleConfig"
    with pytest.raises(RecipeError, match=r"^--set sample.max_new_tokens=3: sample.max_new_tokens: unknown field for"):
        runner.evaluate(opts)
    with pytest.raises(RecipeError, match=r"^--sampler rk4: sample.sampler: input should be"):
        args = ["eval", "-c", str(elf_run), "--sampler", "rk4", "-o", str(tmp_path)]
        CliRunner().invoke(app, args, catch_exceptions=False)
