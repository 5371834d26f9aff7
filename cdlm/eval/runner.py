"""``cdlm eval``: sample (or read samples), compute the metrics, write ``metrics.json`` and ``samples.jsonl``.

Three kinds of evaluation, chosen by the inputs:

* **unconditional** (no ``input``, no ``task``): Gen PPL and entropy by default; MAUVE against ``references``;
* **conditional** (``input``: JSONL of ``source``/``target``): each source conditions one sample; BLEU and
  ROUGE against the targets by default;
* **task** (``task``: one of Cola's 8 benchmark tasks): ``input`` rows become the reference's prompts, and the
  generations are scored as ``acc_calc.py`` scores them; or ``samples`` holds the reference's generation records.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdlm.api import Pretrained, load_pretrained
from cdlm.config import RunConfig
from cdlm.errors import DataError
from cdlm.eval import cola_prompts, cola_scoring, inputs, record, sweep, text_metrics
from cdlm.eval.entropy import mean_entropy
from cdlm.eval.gen_ppl import Judge, JudgeDtype, generative_perplexity, judge_tokens, load_judge
from cdlm.eval.generate import Generation, generate
from cdlm.recipes import raw_config, with_overrides
from cdlm.sampling.types import StepCallback

METRICS = ("gen_ppl", "entropy", "mauve", "bleu", "rouge", "accuracy")
DEFAULT_METRICS = {"unconditional": ("gen_ppl", "entropy"), "conditional": ("bleu", "rouge"), "task": ("accuracy",)}
ALLOWED = {"unconditional": {"gen_ppl", "entropy", "mauve"}, "conditional": set(METRICS) - {"accuracy"}}
ALLOWED["task"] = {"accuracy"}
METRICS_FILE, SAMPLES_FILE = "metrics.json", "samples.jsonl"


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate and how (the flags of ``cdlm eval``).

    Attributes:
        output_dir: where ``metrics.json``, ``samples.jsonl`` and a sweep's ``sweep.csv``/``sweep.png`` go.
        checkpoint: the model to sample (anything :func:`cdlm.load_pretrained` reads); or
        samples: an existing samples JSONL to score.
        input: conditional rows (``source``/``target``) or, with ``task``, task rows.
        task: a Cola benchmark task (:data:`cdlm.eval.cola_prompts.TASKS`).
        references: human texts for MAUVE (JSONL ``text`` or ``.txt`` lines).
        metrics: the metrics to compute; None takes the kind's defaults.
        judge: Gen PPL judge, any causal LM (hub id or local directory); its tokenizer also serves the entropy.
        judge_dtype: the judge's dtype (the reference's is bf16).
        judge_batch_size: samples per judge forward (``eval_ppl.py``'s 16).
        max_length: judge truncation length (1024).
        mauve_encoder: MAUVE's feature model.
        steps: solver steps to evaluate, one run each (a sweep when several); empty keeps the model's.
        overrides: ``KEY=VALUE`` overrides of the model's config (``sample.*`` for sampling settings).
        device: where the model and judge run; default CUDA when available.
        command: the command line, recorded as it was given.
    """

    output_dir: Path
    checkpoint: str | None = None
    samples: Path | None = None
    input: Path | None = None
    task: str | None = None
    references: Path | None = None
    metrics: tuple[str, ...] | None = None
    judge: str = "gpt2-large"
    judge_dtype: JudgeDtype = "bf16"
    judge_batch_size: int = 16
    max_length: int = 1024
    mauve_encoder: str = "gpt2-large"
    steps: tuple[int, ...] = ()
    overrides: tuple[str, ...] = ()
    device: str | None = None
    command: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """``"task"``, ``"conditional"`` or ``"unconditional"``."""
        return "task" if self.task else "conditional" if self.input else "unconditional"


@dataclass
class Hooks:
    """Callbacks: a solver step, a judge batch (done, total), a status line, and the loaded model's config.

    ``on_loaded`` sees the config before the ``sample.*`` overrides are applied to it (``cdlm eval`` refuses there
    a sampling flag the method does not use).
    """

    on_step: StepCallback | None = None
    on_batch: Callable[[int, int], None] | None = None
    on_message: Callable[[str], None] = field(default=lambda message: None)
    on_loaded: Callable[[RunConfig], None] = field(default=lambda config: None)


def _check(opts: EvalOptions) -> tuple[str, ...]:
    """Validate the combination of inputs; return the metrics to compute."""
    if (opts.checkpoint is None) == (opts.samples is None):
        raise DataError("give exactly one of --checkpoint (sample, then score) or --samples FILE (score a file)")
    if opts.samples is not None and opts.steps:
        raise DataError("--steps samples a model; with --samples the texts are already there")
    if opts.task is not None and opts.task not in cola_prompts.TASKS:
        raise DataError(f"--task {opts.task}: unknown task; expected one of {list(cola_prompts.TASKS)}")
    if opts.task is not None and opts.checkpoint is not None and opts.input is None:
        raise DataError(f"--task {opts.task} with --checkpoint needs --input FILE.jsonl of task rows")
    metrics = opts.metrics or DEFAULT_METRICS[opts.kind]
    wrong = [m for m in metrics if m not in ALLOWED[opts.kind]]
    if wrong:
        raise DataError(
            f"--metrics {','.join(metrics)}: {wrong} do not apply to a {opts.kind} evaluation; "
            f"choose from {sorted(ALLOWED[opts.kind])}"
        )
    if "mauve" in metrics and opts.references is None:
        raise DataError("--metrics mauve needs --references FILE (human texts: JSONL 'text' or .txt lines)")
    return tuple(metrics)


class _Scorer:
    """Computes text metrics, loading the judge once (and only the tokenizer when no Gen PPL is asked)."""

    def __init__(self, opts: EvalOptions, metrics: tuple[str, ...], device: torch.device, hooks: Hooks) -> None:
        self.opts, self.metrics, self.device, self.hooks = opts, metrics, device, hooks
        self.judge: Judge | None = None
        self.references = None if opts.references is None else inputs.references(opts.references)

    def _judge(self) -> Judge:
        if self.judge is None:
            self.hooks.on_message(f"loading judge {self.opts.judge}")
            self.judge = load_judge(
                self.opts.judge,
                dtype=self.opts.judge_dtype,
                device=self.device,
                with_model="gen_ppl" in self.metrics,
            )
        return self.judge

    def score(self, texts: Sequence[str], targets: Sequence[str] | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "gen_ppl" in self.metrics:
            ppl = generative_perplexity(
                self._judge(),
                texts,
                batch_size=self.opts.judge_batch_size,
                max_length=self.opts.max_length,
                context_size=self.opts.max_length,
                on_batch=self.hooks.on_batch,
            )
            out.update(gen_ppl=ppl.ppl, scored_samples=len(ppl.tokens), empty_samples=ppl.num_dropped)
            tokens = ppl.tokens
        elif "entropy" in self.metrics:
            tokens = judge_tokens(self._judge(), texts, self.opts.max_length)
        if "entropy" in self.metrics:
            out["entropy"] = mean_entropy(tokens)
        if "mauve" in self.metrics:
            assert self.references is not None
            out["mauve"] = text_metrics.mauve(
                texts,
                self.references,
                encoder=self.opts.mauve_encoder,
                max_length=self.opts.max_length,
                device=str(self.device),
            )
        if ("bleu" in self.metrics or "rouge" in self.metrics) and targets is None:
            raise DataError("bleu/rouge need references: give --input rows with 'target', or samples with 'target'")
        if "bleu" in self.metrics:
            out["bleu"] = text_metrics.bleu(texts, targets)
        if "rouge" in self.metrics:
            out.update(text_metrics.rouge(texts, targets))
        return out


def _task_records(generation: Generation | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return generation records in the reference's layout (``id, prompt, generate, ground_truth, choices``)."""
    if generation is None:
        return rows
    records = []
    for row, s in zip(rows, generation.samples, strict=True):
        rec = {
            "id": row.get("id"),
            "prompt": s.prompt,
            "generate": s.text,
            "ground_truth": cola_prompts.ground_truth(row),
        }
        if row.get("choices"):
            rec["choices"] = row["choices"]
        records.append(rec)
    return records


def _run_once(
    opts: EvalOptions, loaded: Pretrained | None, steps: int | None, scorer: _Scorer, hooks: Hooks
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sample once (or read the samples) and score; return the result entry and the sample records."""
    rows = None if opts.input is None else inputs.read_jsonl(opts.input, "--input")
    generation = None
    if loaded is not None:
        prompts = ids = None
        if opts.task is not None:
            prompts = [cola_prompts.prompt(opts.task, r) for r in rows]
            ids = [r.get("id") for r in rows]
        elif rows is not None:
            prompts, _ = inputs.pairs(rows, opts.input)
        overrides = [] if steps is None else [f"sample.steps={steps}"]
        hooks.on_message(f"sampling{'' if steps is None else f' with {steps} steps'}")
        generation = generate(
            loaded,
            prompts=prompts,
            sample_ids=ids,
            overrides=overrides,
            on_step=hooks.on_step,
            keep_special_tokens=opts.task is not None,
        )
    entry: dict[str, Any] = {}
    if generation is not None:
        s = generation.settings
        entry = {
            "steps": s.steps,
            "nfe": generation.nfe,
            "seconds": round(generation.seconds, 3),
            "num_samples": len(generation.samples),
        }
    if opts.task is not None:
        source = rows if generation is not None else inputs.read_jsonl(opts.samples, "--samples")
        records = _task_records(generation, source)
        for rec in records:
            rec["correct"] = cola_scoring.is_correct(opts.task, rec)
        score = cola_scoring.score_task(opts.task, records)
        entry["metrics"] = {"accuracy": score.accuracy, "correct": score.correct, "total": score.total}
        return entry, records
    if generation is not None:
        records = [s.to_json() for s in generation.samples]
        texts = [s.text for s in generation.samples]
        targets = None if rows is None else inputs.pairs(rows, opts.input)[1]
        if targets is not None:
            for rec, target in zip(records, targets, strict=True):
                rec["target"] = target
    else:
        records = inputs.read_jsonl(opts.samples, "--samples")
        texts = inputs.texts(records, opts.samples)
        has_targets = all(any(f in r for f in inputs.TARGET_FIELDS) for r in records)
        targets = [inputs.field(r, inputs.TARGET_FIELDS, str(opts.samples)) for r in records] if has_targets else None
    entry["metrics"] = scorer.score(texts, targets)
    return entry, records


def _load(checkpoint: str, overrides: Sequence[str], device: torch.device, hooks: Hooks) -> Pretrained:
    """Load the model with the overrides that build it, show its config to ``hooks``, then apply ``sample.*``."""
    sampling = [o for o in overrides if o.strip().startswith("sample.") and not o.strip().startswith("sample.use_ema")]
    loaded = load_pretrained(checkpoint, overrides=[o for o in overrides if o not in sampling], device=device)
    hooks.on_loaded(loaded.config)
    if not sampling:
        return loaded
    return dataclasses.replace(loaded, config=with_overrides(raw_config(loaded.config), sampling))


def evaluate(opts: EvalOptions, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run an evaluation and write ``metrics.json`` and ``samples.jsonl`` (plus the sweep files when steps > 1).

    Returns:
        The ``metrics.json`` record: ``results`` (one entry per steps value: steps, NFE, seconds, metrics) and
        everything needed to rerun it (model, sampler settings, seed, judge, inputs, versions, device).

    Raises:
        DataError: an invalid combination of options or an unreadable input.
        CheckpointError: the model or the judge cannot be loaded.
    """
    hooks = hooks or Hooks()
    metrics = _check(opts)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = None
    if opts.checkpoint is not None:
        hooks.on_message(f"loading {opts.checkpoint}")
        loaded = _load(opts.checkpoint, opts.overrides, device, hooks)
    scorer = _Scorer(opts, metrics, device, hooks)
    results, all_records = [], []
    for steps in opts.steps or [None]:
        entry, records = _run_once(opts, loaded, steps, scorer, hooks)
        results.append(entry)
        all_records += [{**r, "steps": steps} if len(opts.steps) > 1 else r for r in records]
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / SAMPLES_FILE).open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in all_records)
    summary: dict[str, Any] = {
        "kind": opts.kind,
        "task": opts.task,
        "metrics": list(metrics),
        "results": results,
        "command": list(opts.command) or None,
    }
    if loaded is not None:
        summary["model"] = record.model_record(loaded, opts.checkpoint)
        summary["sampler"] = loaded.config.sample.model_dump(mode="json")
        summary["seed"] = loaded.config.sample.seed
        summary["overrides"] = list(opts.overrides)
    if scorer.judge is not None:
        summary["judge"] = record.judge_record(scorer.judge, opts.max_length, opts.judge_batch_size)
    if "mauve" in metrics:
        summary["mauve_encoder"] = opts.mauve_encoder
    summary["inputs"] = {
        name: {"path": str(path), "sha256": record.file_sha256(path)}
        for name, path in (("samples", opts.samples), ("input", opts.input), ("references", opts.references))
        if path is not None
    }
    summary["device"] = record.device_record(device)
    summary["packages"] = record.package_versions()
    record.write_json(out / METRICS_FILE, summary)
    if len(results) > 1:
        rows = sweep.rows(results)
        sweep.write_csv(rows, out / sweep.CSV_FILE)
        sweep.plot(rows, out / sweep.PNG_FILE, title=opts.checkpoint or "")
    return summary
