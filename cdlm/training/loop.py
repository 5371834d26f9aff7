"""The one training loop: any :class:`~cdlm.interfaces.Method`, on Accelerate, exactly resumable.

What it does, in order: seeds Python/NumPy/torch once from ``config.seed + rank``; optimises only
``method.trainable`` (frozen modules are put in eval mode without gradients) through the prepared
:class:`~cdlm.training.distributed.TrainingModule`; per optimizer step runs ``train.grad_accum`` micro-batches
under ``accelerator.accumulate`` (``accelerator.backward`` divides each loss by ``grad_accum``; DDP reduces the
gradients in buckets during the last micro-batch's backward only), clips them (unscaled first under fp16;
logging the pre-clip norm), steps the optimizer and, unless fp16's scaler skipped the step, the LR schedule and
the EMA. Mixed precision is Accelerate's (:func:`~cdlm.training.distributed.make_accelerator`).

Data-parallel slots: a step's global batch is ``P × grad_accum`` micro-batches (P processes). Micro-batch j of
process r is slot ``s = r·grad_accum + j``: its rows come from loader shard s of ``P·grad_accum`` and its random
draws from the generator ``"objective"`` (j = 0) or ``"objective.j"``, seeded ``config.seed + s``. So a run
depends on the slot count, not on how slots are laid out: 2 processes × 1 micro-batch train the same model as
1 process × 2 micro-batches (to fp32 rounding).

Outputs in ``run_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per log step:
``step, loss, lr, grad_norm, tokens_per_s, elapsed_s`` then the objective's metrics, each the mean over the
step's micro-batches and processes; the same record goes to Accelerate trackers and ``on_log``) and
checkpoints (:mod:`cdlm.training.checkpoint`) every ``train.save_every`` steps and at the end. A checkpoint
holds every module of ``Method.modules()``, frozen ones included, so it is self-contained.

Resume: when ``run_dir`` has a checkpoint, the model, EMA, optimizer, schedule, step, loader position and
every RNG are restored, and ``metrics.jsonl`` is cut back to that step. A damaged latest checkpoint (a file
missing, truncated or unreadable) is reported and the newest complete one before it is used instead.

Stops: SIGINT, SIGTERM and ``train.max_minutes`` end the run after the current step with a checkpoint of it
(:mod:`cdlm.training.stop`); a non-finite loss or gradient norm stops it before the update, with a
:class:`~cdlm.errors.TrainingError` naming the step and the last good checkpoint. Non-finite metric values are
written as ``null``, so ``metrics.jsonl`` stays valid JSON. On CPU a run interrupted and resumed
is bit-identical to an uninterrupted one (same world size required). Multi-process: each process saves its
own RNG record; ``lr`` and the loader position are the same everywhere.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from torch import Tensor

from cdlm.config import RunConfig
from cdlm.data.loader import ResumableLoader
from cdlm.errors import CheckpointError, TrainingError
from cdlm.interfaces import Method, TokenBatch
from cdlm.training.checkpoint import (
    capture_rng_state,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from cdlm.training.distributed import TrainingModule, make_accelerator
from cdlm.training.ema import EMA
from cdlm.training.optim import build_lr_schedule, build_optimizer
from cdlm.training.stop import StopRequests

logger = get_logger(__name__)

METRICS_FILE, CONFIG_FILE = "metrics.jsonl", "config.yaml"
OBJECTIVE_GENERATOR = "objective"


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
    rows: TokenBatch,
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
        rows: the packed corpus (:func:`cdlm.data.pack.prepare`): ids (R, L) int64, mask, cond_mask (R, L) bool.
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
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    accelerator = make_accelerator(cfg, str(run_dir))
    set_seed(config.seed, device_specific=True)  # seed + rank
    if config_yaml is None:
        config_yaml = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    state = _TrainState(config, method, rows, accelerator)
    state.resume(run_dir, on_status if accelerator.is_main_process else None)
    if accelerator.is_main_process:  # only once the resume worked: a failed start leaves the run's files alone
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        _truncate_metrics(run_dir / METRICS_FILE, state.step)
    if cfg.trackers:
        accelerator.init_trackers(run_dir.name, config=_flat(config.model_dump(mode="json")))
    record: dict[str, float] = {}
    checkpoint = state.resumed_from
    start = last_log = time.perf_counter()
    tokens, stopped = 0, None
    with StopRequests(cfg.max_minutes) as stop:
        while state.step < cfg.steps and stopped is None:
            stats = state.optimizer_step(checkpoint)
            tokens += stats.tokens
            elapsed = state.elapsed_base + time.perf_counter() - start
            stopped = state.agree(stop.reason())
            if state.step % cfg.log_every == 0 or state.step == cfg.steps or stopped:
                now = time.perf_counter()
                record = stats.record(accelerator, state.step, tokens / max(now - last_log, 1e-9), elapsed)
                tokens, last_log = 0, now
                _emit(accelerator, run_dir, record, on_log)
            if state.step % cfg.save_every == 0 or state.step == cfg.steps or stopped:
                checkpoint = state.save(run_dir, config_yaml, elapsed)
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group the next stage needs
        tracker.finish()
    if not record:
        record = last_record(run_dir / METRICS_FILE)
    return TrainResult(run_dir=run_dir, step=state.step, checkpoint=checkpoint, metrics=record, stopped=stopped)


class _TrainState:
    """Everything a checkpoint restores: model, optimiser, schedule, EMA, loader, generators, step."""

    def __init__(self, config: RunConfig, method: Method, rows: TokenBatch, accelerator: Accelerator) -> None:
        self.config, self.method, self.accelerator = config, method, accelerator
        rank, world, accum = accelerator.process_index, accelerator.num_processes, config.train.grad_accum
        slots = [rank * accum + j for j in range(accum)]  # this process's data-parallel slots, one per micro-batch
        self.loaders = [
            ResumableLoader(
                rows, config.train.batch_size, seed=config.seed, process_index=s, num_processes=world * accum
            )
            for s in slots
        ]
        self.model = method.modules().to(accelerator.device)
        for module in method.frozen.values():
            module.eval().requires_grad_(False)
        for module in method.trainable.values():
            module.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(self.model.named_parameters(), config.train)
        self.scheduler = build_lr_schedule(optimizer, config.train)  # stepped here, not by Accelerate
        self.module, self.optimizer = accelerator.prepare(TrainingModule(method), optimizer)
        self.ema = EMA(self.model, config.train.ema_decay)
        self.generators = {
            _generator_name(j): torch.Generator().manual_seed(config.seed + s) for j, s in enumerate(slots)
        }
        self.step, self.elapsed_base = 0, 0.0
        self.resumed_from: Path | None = None

    def resume(self, run_dir: Path, on_status: Callable[[str], None] | None) -> None:
        """Restore everything from the newest readable checkpoint of ``run_dir``, if there is one.

        Raises:
            CheckpointError: checkpoints exist but none can be read, or the one read does not fit the method.
        """
        say = on_status or (lambda message: None)
        found = list_checkpoints(run_dir)
        damaged: list[str] = []
        for path in reversed(found):
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
        try:
            self.model.load_state_dict(ckpt.model_state, strict=True)
            self.ema.load_state_dict(ckpt.ema_state)
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(
                f"{path}: does not fit the model being trained ({first}); was the run trained with another model "
                "config? Train into a new --output-dir"
            ) from None
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        for loader in self.loaders:  # every slot's loader is at the same epoch and position
            loader.load_state_dict(ckpt.loader_state)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if len(ckpt.rng_state) == world:
            restore_rng_state(ckpt.rng_state[rank], self.generators)
        else:
            logger.warning(
                f"{path}: saved by {len(ckpt.rng_state)} process(es), resumed on {world}: RNGs are re-seeded, "
                "so the run continues but is not bit-identical to an uninterrupted one"
            )
        self.step, self.elapsed_base, self.resumed_from = ckpt.step, ckpt.elapsed_s, path
        logger.info(f"resumed from {path} at step {ckpt.step}")
        say(f"resumed from step {ckpt.step} ({path})" + (" after passing over a damaged checkpoint" if damaged else ""))

    def agree(self, reason: str | None) -> str | None:
        """Return the stop reason every process acts on: any process's request stops all of them."""
        if self.accelerator.num_processes == 1:
            return reason
        reasons = [r for r in gather_object([reason]) if r is not None]
        return reasons[0] if reasons else None

    def optimizer_step(self, last_checkpoint: Path | None) -> _StepStats:
        """Run one optimizer step over ``grad_accum`` micro-batches and return what it measured.

        Raises:
            TrainingError: the loss or the gradient norm is not finite (checked before the update, so the
                weights and the checkpoints stay finite).
        """
        cfg, accelerator = self.config.train, self.accelerator
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for j, loader in enumerate(self.loaders):
            batch = next(loader).to(accelerator.device)
            with accelerator.accumulate(self.module):  # DDP syncs on the last micro-batch only
                loss, metrics = self.module(batch, self.generators[_generator_name(j)])
                accelerator.backward(loss)  # divides by train.grad_accum (= Accelerate's accumulation steps)
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float64)
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm is not None else float("inf")
        grad_norm = accelerator.clip_grad_norm_(self.params, max_norm)  # pre-clip total norm, unscaled under fp16
        # fp16: an overflow is the scaler's to handle (it skips the step and lowers the scale), not a stop.
        self._check_finite(sums["loss"], grad_norm if accelerator.scaler is None else None, last_checkpoint)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
            self.ema.update(self.model)
        self.step += 1
        means = {key: total / cfg.grad_accum for key, total in sums.items()}
        tokens = cfg.grad_accum * batch.ids.numel() * self.accelerator.num_processes
        return _StepStats(means=means, lr=lr, grad_norm=grad_norm, tokens=tokens)

    def _check_finite(self, loss: Tensor, grad_norm: Tensor | None, last_checkpoint: Path | None) -> None:
        loss = loss.to(self.accelerator.device)
        bad = ~torch.isfinite(loss) if grad_norm is None else ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        bad = bad.float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise TrainingError(
            f"step {self.step + 1}: non-finite loss ({float(loss) / self.config.train.grad_accum}) or gradient norm "
            f"({'not checked' if grad_norm is None else float(grad_norm)}); stopped before the update, {where}. "
            "Lower train.lr or check the data, then rerun "
            "to resume from that checkpoint"
        )

    def save(self, run_dir: Path, config_yaml: str, elapsed_s: float) -> Path:
        """Write a checkpoint of the current step (main process) and wait for every process."""
        rng = gather_object([capture_rng_state(self.generators)])
        if self.accelerator.is_main_process:
            save_checkpoint(
                run_dir,
                self.step,
                model_state=self.model.state_dict(),
                ema_state=self.ema.state_dict(),
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                loader_state=self.loaders[0].state_dict(),
                rng_state=rng,
                config_yaml=config_yaml,
                keep_last=self.config.train.keep_last,
                elapsed_s=elapsed_s,
            )
        self.accelerator.wait_for_everyone()
        return checkpoint_dir(run_dir, self.step)


@dataclass(frozen=True)
class _StepStats:
    """One optimizer step's measurements, kept as tensors until a log step needs them.

    Attributes:
        means: "loss" and the objective's metrics, averaged over the micro-batches (fp64, this process).
        lr: learning rate the step used (first param group).
        grad_norm: () total gradient norm before clipping.
        tokens: token positions processed by all processes.
    """

    means: dict[str, Tensor]
    lr: float
    grad_norm: Tensor
    tokens: int

    def record(self, accelerator: Accelerator, step: int, tokens_per_s: float, elapsed_s: float) -> dict[str, float]:
        """Return the metrics line: the fixed keys, then the objective's metrics averaged across processes."""
        names = list(self.means)
        stacked = torch.stack([self.means[k].to(accelerator.device) for k in names])  # (metrics,) fp64
        values = accelerator.reduce(stacked, reduction="mean").tolist()
        metrics = dict(zip(names, values, strict=True))
        fixed = {"step": step, "loss": metrics.pop("loss"), "lr": self.lr, "grad_norm": float(self.grad_norm)}
        return {**fixed, "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s, **metrics}


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


def _generator_name(micro_batch: int) -> str:
    """Name of the objective generator of a process's ``micro_batch``-th slot ("objective", "objective.1", …)."""
    return OBJECTIVE_GENERATOR if micro_batch == 0 else f"{OBJECTIVE_GENERATOR}.{micro_batch}"


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
