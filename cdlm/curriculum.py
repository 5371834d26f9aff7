"""The progressive-distillation curriculum behind ``cdlm distill`` (ELF spec §8 "Curriculum").

Rounds of :func:`cdlm.train`, each halving the student's steps and starting from the previous round's EMA weights.

Round 1 starts from the teacher's EMA weights; the teacher stays the same in every round. A round is one stage of
a staged config: the stages of ``recipe`` when given, otherwise generated from the teacher's own config
(``model.distill.steps`` student steps in round 1, halved each round, with ``steps × teacher_steps`` teacher
sub-steps over the whole path kept constant). The rounds run as one staged :func:`cdlm.train` into ``OUTPUT_DIR``
(round k in ``OUTPUT_DIR/<stage name>``; rerun to resume), with the teacher's tokenizer.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cdlm.api import train as train_run
from cdlm.config import RunConfig
from cdlm.data.tokenize import TOKENIZER_FILE
from cdlm.errors import RecipeError
from cdlm.loading import read_source
from cdlm.recipes import load_recipe, raw_config, with_overrides
from cdlm.training.distill import DistillConfig
from cdlm.training.loop import TrainResult


def curriculum(first_steps: int, teacher_steps: int, rounds: int) -> list[dict[str, Any]]:
    """Return ``rounds`` stages halving the student steps from ``first_steps``, teacher resolution kept constant.

    Raises:
        RecipeError: more rounds than halvings of ``first_steps`` down to 1 step.
    """
    resolution = first_steps * teacher_steps  # teacher sub-steps over the whole path (64 in the reference)
    if rounds < 1 or first_steps >> (rounds - 1) < 1:
        raise RecipeError(
            f"--rounds {rounds}: expected 1 to {first_steps.bit_length()} rounds (each halves the "
            f"model.distill.steps={first_steps} student steps, down to 1)"
        )
    stages = []
    for k in range(rounds):
        steps = first_steps >> k
        overrides = {"model": {"distill": {"steps": steps, "teacher_steps": resolution // steps}}}
        stages.append({"name": f"round{k + 1}_{steps}step", "overrides": {**overrides, "sample": {"steps": steps}}})
    return stages


def plan(
    teacher: str | Path, *, rounds: int | None = None, recipe: str | Path | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """Return the staged config of a distillation run: one stage per round, ``model.distill.teacher`` set.

    Args:
        teacher: anything :func:`cdlm.load_pretrained` reads.
        rounds: keep the first ``rounds`` rounds (all of the recipe's; 5 when generated, as the reference).
        recipe: a staged distillation recipe (``elf-tiny-pd``) whose model builds the teacher's architecture;
            None: the teacher's own config with a generated curriculum.
        overrides: ``KEY=VALUE`` overrides (``train.steps=200``, ``stages.NAME.KEY=VALUE``).

    Raises:
        RecipeError: the method has no ``model.distill`` section, or ``rounds`` does not fit the curriculum.
    """
    base = load_recipe(recipe) if recipe is not None else read_source(teacher).config
    raw = raw_config(base)
    if "distill" not in raw["model"]:
        raise RecipeError(
            f"method {base.method!r}: its model section has no 'distill' field, so it cannot be distilled; a plugin "
            "opts in with `distill: DistillConfig | None` (cdlm.training.distill)"
        )
    settings = base.model.distill or DistillConfig()  # the method's own class when the recipe sets it
    raw["model"]["distill"] = {**settings.model_dump(mode="json"), "teacher": str(teacher)}
    if not raw.get("stages"):
        raw["stages"] = curriculum(settings.steps, settings.teacher_steps, rounds or 5)
    elif rounds is not None:
        if not 1 <= rounds <= len(raw["stages"]):
            raise RecipeError(f"--rounds {rounds}: the recipe has {len(raw['stages'])} rounds (stages)")
        raw["stages"] = raw["stages"][:rounds]
    # round 1 starts from the teacher, every later one from the round before (cdlm.train's default for stages),
    # each from the EMA weights (spec §8)
    raw["train"] = {**raw.get("train", {}), "init_from": None, "init_weights": "ema"}
    first = raw["stages"][0].setdefault("overrides", {})
    first["train"] = {**first.get("train", {}), "init_from": str(teacher)}
    return with_overrides(raw, overrides)


def distill(
    teacher: str | Path,
    output_dir: str | Path,
    *,
    rounds: int | None = None,
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
) -> TrainResult:
    """Distil ``teacher`` into a few-step student, round by round (see the module docstring and :func:`plan`).

    Args:
        teacher: the frozen teacher (a run, checkpoint, ``save_pretrained`` or released directory, or hub id).
        output_dir: each round trains into ``output_dir/<round name>``; sample the last one.
        rounds: number of rounds (see :func:`plan`).
        recipe: a staged distillation recipe, or None for the teacher's config (see :func:`plan`).
        overrides: ``KEY=VALUE`` overrides of every round (``stages.NAME.KEY=VALUE`` for one round).
        on_log: called with every logged metrics record.
        on_status: called with one-line news (data phases, resumes, round starts).
        on_stage: called as each round starts with its name and its ``train.steps``.

    Returns:
        The last round's result (or the round a SIGINT, SIGTERM or time limit stopped).
    """
    config = plan(teacher, rounds=rounds, recipe=recipe, overrides=overrides)
    out = Path(output_dir)
    _share_tokenizer(teacher, out)
    return train_run(config, out, on_log=on_log, on_status=on_status, on_stage=on_stage)


def _share_tokenizer(teacher: str | Path, run_dir: Path) -> None:
    """Put the teacher's trained BPE in ``run_dir`` so every round trains on the teacher's token ids."""
    trained = read_source(teacher).tokenizer_dir / TOKENIZER_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    if trained.is_file() and not (run_dir / TOKENIZER_FILE).is_file():
        shutil.copyfile(trained, run_dir / TOKENIZER_FILE)
