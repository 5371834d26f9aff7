"""The one training loop: any :class:`~cdlm.interfaces.Method`, on Accelerate, exactly resumable.

The loop is a :class:`~cdlm.training.trainer.Trainer` (one optimizer step: micro-batches, mixed precision,
clipping, LR schedule, EMA, per-slot generators, non-finite checks; see :mod:`cdlm.training.trainer`) driven
for ``config.train.steps`` steps, plus what a run around it needs: resume, logging, periodic checkpoints and
stop conditions.

Outputs in ``run_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per log step:
``step, loss, lr, grad_norm, tokens_per_s, elapsed_s`` then the objective's metrics, each the mean over the
step's micro-batches and processes; the same record goes to Accelerate trackers and ``on_log``) and
checkpoints (:mod:`cdlm.training.checkpoint`) every ``train.save_every`` steps and at the end.

Resume: when ``run_dir`` has a checkpoint, the model, EMA, optimizer, schedule, step, loader position and
every RNG are restored (:meth:`Trainer.load <cdlm.training.trainer.Trainer.load>`), and ``metrics.jsonl`` is
cut back to that step. A damaged latest checkpoint (a file missing, truncated or unreadable) is reported and
the newest complete one before it is used instead.

Stops: SIGINT, SIGTERM and ``train.max_minutes`` end the run after the current step with a checkpoint of it
(:mod:`cdlm.training.stop`); a non-finite loss or gradient norm stops it before the update, with a
:class:`~cdlm.errors.TrainingError` naming the step and the last good checkpoint. Non-finite metric values are
written as ``null``, so ``metrics.jsonl`` stays valid JSON. On CPU a run interrupted and resumed
is bit-identical to an uninterrupted one (same world size required).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from cdlm.config import RunConfig
from cdlm.data.cache import TokenRows
from cdlm.data.stream import RowStream
from cdlm.errors import CheckpointError
from cdlm.interfaces import Method, TokenBatch
from cdlm.training.checkpoint import list_checkpoints, load_checkpoint
from cdlm.training.stop import StopRequests
from cdlm.training.trainer import Trainer

logger = get_logger(__name__)

METRICS_FILE, CONFIG_FILE = "metrics.jsonl", "config.yaml"


@dataclass(frozen=True)
class TrainResult:
    """What a call of :func:`train` ended with.

    Attributes:
        run_dir: the run directory.
        step: optimizer steps taken in total (resumed steps included).
        checkpoint: the last checkpoint directory, or None when none exists.
        metrics: the last record logged (by an earlier call when this one had no step left to take; empty when
            none was ever logged).
        stopped: why the run stopped before ``train.steps``: ``"SIGINT"``, ``"SIGTERM"`` or ``"time limit"``;
            None when it reached ``train.steps``.
    """

    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None


def train(
    config: RunConfig,
    method: Method,
    run_dir: Path,
    rows: TokenBatch | TokenRows | RowStream,
    *,
    config_yaml: str | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``method`` on ``rows`` for ``config.train.steps`` optimizer steps, resuming from ``run_dir``.

    Args:
        config: the validated run config (``seed``, ``train`` are read here).
        method: the built method; its modules are moved to the Accelerate device in place.
        run_dir: where config, metrics and checkpoints go; an existing checkpoint there is resumed.
        rows: the packed corpus (:func:`cdlm.data.pack.prepare`): ids (R, L) int64, mask, cond_mask (R, L) bool,
            as a TokenBatch, cached rows or a stream.
        config_yaml: the resolved config as YAML; defaults to dumping ``config``.
        on_log: called on the main process with every metrics record (the CLI renders progress from it).
        on_status: called on the main process with one-line news: resumed from a step, a damaged checkpoint
            passed over.

    Returns:
        The final step, the last checkpoint, the last logged record and why it stopped early, if it did.

    Raises:
        CheckpointError: no checkpoint in ``run_dir`` can be read, or the one read does not fit the method.
        DataError: ``rows`` cannot fill one batch, or the saved loader position does not fit them.
        TrainingError: a non-finite loss or gradient norm.
    """
    run_dir = Path(run_dir)
    cfg = config.train
    trainer = Trainer(config, method, rows, run_dir=run_dir, config_yaml=config_yaml)
    accelerator = trainer.accelerator
    _resume(trainer, run_dir, on_status if accelerator.is_main_process else None)
    if accelerator.is_main_process:  # only once the resume worked: a failed start leaves the run's files alone
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(trainer.config_yaml, encoding="utf-8")
        _truncate_metrics(run_dir / METRICS_FILE, trainer.global_step)
    if cfg.trackers:
        accelerator.init_trackers(run_dir.name, config=_flat(config.model_dump(mode="json")))
    record: dict[str, float] = {}
    last_log = time.perf_counter()
    tokens, stopped = 0, None
    with StopRequests(cfg.max_minutes) as stop:
        while trainer.global_step < cfg.steps and stopped is None:
            stats = trainer.step()
            tokens += stats.tokens
            stopped = _agree(accelerator, stop.reason())
            if stats.step % cfg.log_every == 0 or stats.step == cfg.steps or stopped:
                now = time.perf_counter()
                record = stats.record(accelerator, tokens / max(now - last_log, 1e-9), trainer.elapsed_s)
                tokens, last_log = 0, now
                _emit(accelerator, run_dir, record, on_log)
            if stats.step % cfg.save_every == 0 or stats.step == cfg.steps or stopped:
                trainer.save(run_dir)
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group the next stage needs
        tracker.finish()
    if not record:
        record = last_record(run_dir / METRICS_FILE)
    return TrainResult(
        run_dir=run_dir, step=trainer.global_step, checkpoint=trainer.last_checkpoint, metrics=record, stopped=stopped
    )


def _resume(trainer: Trainer, run_dir: Path, on_status: Callable[[str], None] | None) -> None:
    """Load the newest readable checkpoint of ``run_dir`` into ``trainer``, if there is one.

    Raises:
        CheckpointError: checkpoints exist but none can be read, or the one read does not fit the method.
    """
    say = on_status or (lambda message: None)
    damaged: list[str] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = load_checkpoint(path)
            break
        except CheckpointError as err:
            damaged.append(str(err))
            logger.warning(f"{err}; trying the previous checkpoint")
            say(f"warning: {err}; passing over {path.name}")
    else:
        if damaged:
            raise CheckpointError(
                f"{run_dir}: no readable checkpoint ({damaged[0]}); move {run_dir / 'checkpoints'} aside to train "
                "from scratch"
            )
        return
    trainer.load(ckpt)
    logger.info(f"resumed from {path} at step {ckpt.step}")
    say(f"resumed from step {ckpt.step} ({path})" + (" after passing over a damaged checkpoint" if damaged else ""))


def _agree(accelerator: Accelerator, reason: str | None) -> str | None:
    """Return the stop reason every process acts on: any process's request stops all of them."""
    if accelerator.num_processes == 1:
        return reason
    reasons = [r for r in gather_object([reason]) if r is not None]
    return reasons[0] if reasons else None


def _emit(
    accelerator: Accelerator, run_dir: Path, record: dict[str, float], on_log: Callable[[dict], None] | None
) -> None:
    """Append the record to metrics.jsonl, send it to the trackers and the hook (main process only)."""
    if not accelerator.is_main_process:
        return
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: v if _finite(v) else None for k, v in record.items()}, allow_nan=False) + "\n")
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))
    if on_log is not None:
        on_log(dict(record))


def _finite(value: object) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def last_record(path: Path) -> dict[str, float]:
    """Return the last line of a metrics file (``RUN_DIR/metrics.jsonl``) as a record ({} when there is none)."""
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after ``step`` (by a session that died before its next checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _flat(tree: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Flatten a nested config into ``section.key`` scalars (lists become strings) for tracker hparams."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
