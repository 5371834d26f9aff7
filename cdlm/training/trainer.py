"""The trainer: one optimizer step of any :class:`~cdlm.interfaces.Method` on Accelerate, exactly resumable.

:class:`Trainer` holds everything a checkpoint restores (model, optimizer, LR schedule, EMA, data loaders,
named generators, step) and takes one optimizer step at a time; :func:`cdlm.training.loop.train` is this
trainer plus data iteration, logging, periodic checkpoints and stop conditions. Research code can drive it
directly and run its own logic between steps.

A step: optimises only ``method.trainable`` (frozen modules are put in eval mode without gradients) through
the prepared :class:`~cdlm.training.distributed.TrainingModule`; runs ``train.grad_accum`` micro-batches under
``accelerator.accumulate`` (``accelerator.backward`` divides each loss by ``grad_accum``; DDP reduces the
gradients in buckets during the last micro-batch's backward only), clips the gradients (unscaled first under
fp16; the pre-clip norm is reported), steps the optimizer and, unless fp16's scaler skipped the step, the LR
schedule and the EMA. Mixed precision is Accelerate's (:func:`~cdlm.training.distributed.make_accelerator`).
A non-finite loss or gradient norm stops the step before the update with a :class:`~cdlm.errors.TrainingError`.

Data-parallel slots: a step's global batch is ``P × grad_accum`` micro-batches (P processes). Micro-batch j of
process r is slot ``s = r·grad_accum + j``: its rows come from loader shard s of ``P·grad_accum`` and its random
draws from the generator ``"objective"`` (j = 0) or ``"objective.j"``, seeded ``config.seed + s``. So a run
depends on the slot count, not on how slots are laid out: 2 processes × 1 micro-batch train the same model as
1 process × 2 micro-batches (to fp32 rounding).

Checkpoints (:mod:`cdlm.training.checkpoint`) hold every module of ``Method.modules()``, frozen ones included,
so they are self-contained. Under FSDP the trainable weights, their gradients, the optimizer state and the EMA
are sharded across processes; :meth:`Trainer.save` gathers them whole (every process takes part, the main one
writes) and :meth:`Trainer.load` reads full tensors and keeps this process's shard
(:mod:`cdlm.training.sharding`), so a checkpoint is the same files with or without FSDP. On CPU, a trainer
loaded from a checkpoint takes the same next step, bit for bit, as the trainer that saved it (same world size
required). Multi-process: each process saves its own RNG record; ``lr`` and the loader position are the same
everywhere.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from torch import Tensor

from cdlm.config import RunConfig
from cdlm.data.cache import TokenRows
from cdlm.data.loader import ResumableLoader
from cdlm.data.stream import RowStream
from cdlm.errors import CheckpointError, DataError, TrainingError
from cdlm.interfaces import Method, TokenBatch
from cdlm.training import sharding
from cdlm.training.checkpoint import (
    CheckpointState,
    capture_rng_state,
    checkpoint_dir,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from cdlm.training.distributed import make_accelerator, prepare
from cdlm.training.ema import EMA
from cdlm.training.optim import build_lr_schedule, build_optimizer
from cdlm.validation import check_run_config

logger = get_logger(__name__)

OBJECTIVE_GENERATOR = "objective"


class Trainer:
    """One optimizer step at a time of ``method`` on ``rows``, as ``cdlm.train`` takes it, with exact checkpoints.

    Constructing a trainer sets torch's CPU threads (``train.num_threads``), creates the Accelerator and seeds
    Python, NumPy and torch from ``config.seed + rank``, as ``cdlm.train`` does. It moves the method's modules to
    the Accelerate device in place. ``train.init_from`` is not read here (``cdlm.train`` applies it): load
    weights into ``method`` before building the trainer. Custom logic that puts a trainable module in eval mode
    must put it back in train mode before the next :meth:`step`. Only one trainer is active per process at a
    time: building another one resets Accelerate's per-process state.

    Args:
        config: the validated run config (``seed`` and ``train`` are read).
        method: the built method (:func:`cdlm.build`).
        rows: the packed corpus (:func:`cdlm.data.pack.prepare`): ids (R, L) int64, mask and cond_mask (R, L)
            bool, as a TokenBatch, cached rows or a stream.
        run_dir: where :meth:`save` writes by default and Accelerate trackers write.
        config_yaml: the resolved config recorded in checkpoints; defaults to dumping ``config``.

    Attributes:
        config: the run config.
        config_yaml: the YAML recorded in every checkpoint.
        method: the method being trained.
        model: ``method.modules()``, on the Accelerate device: what checkpoints hold.
        ema: the EMA of the trainable weights (``ema.state_dict()``; ``with ema.applied(model):`` evaluates
            with them).
        optimizer: the Accelerate-prepared optimizer.
        scheduler: the LR schedule, stepped once per optimizer step.
        accelerator: the run's Accelerator.
        loaders: this process's data loaders, one per micro-batch slot.
        generators: the named objective generators, one per micro-batch slot.

    Raises:
        RecipeError: ``config`` is not a RunConfig.
        DataError: ``rows`` cannot fill one batch on every slot.
        TrainingError: a launch setting the trainer cannot honour (see ``make_accelerator``).

    Example:
        Three steps of the tiny ELF recipe with a look at the loss after each, a checkpoint, and a fresh trainer
        (another initialisation) that resumes from it and takes exactly the same fourth step:

        >>> import tempfile, cdlm
        >>> from cdlm.data.pack import prepare
        >>> from cdlm.training import Trainer
        >>> run_dir = tempfile.mkdtemp()
        >>> config = cdlm.load_recipe("elf-tiny", ["model.depth=1", "train.batch_size=4"])
        >>> rows = prepare(config.data, run_dir).rows  # trains the recipe's BPE into run_dir, packs the corpus
        >>> trainer = Trainer(config, cdlm.build(config), rows, run_dir=run_dir)
        >>> losses = []
        >>> for _ in range(3):
        ...     stats = trainer.step()  # one optimizer step, exactly as cdlm.train takes it
        ...     losses.append(stats.metrics()["loss"])  # your own logic runs between steps
        >>> trainer.global_step, all(loss > 0 for loss in losses)
        (3, True)
        >>> checkpoint = trainer.save()  # run_dir/checkpoints/step-00000003
        >>> fourth = trainer.step().metrics()
        >>> fresh = Trainer(config, cdlm.build(config), rows, run_dir=run_dir)
        >>> fresh.load(checkpoint) == checkpoint
        True
        >>> fresh.step().metrics() == fourth
        True
    """

    def __init__(
        self,
        config: RunConfig,
        method: Method,
        rows: TokenBatch | TokenRows | RowStream,
        *,
        run_dir: str | Path | None = None,
        config_yaml: str | None = None,
    ) -> None:
        self.config = check_run_config(config)
        cfg = config.train
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.accelerator = accelerator = make_accelerator(cfg, None if run_dir is None else str(run_dir))
        set_seed(config.seed, device_specific=True)  # seed + rank
        if config_yaml is None:
            config_yaml = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        self.config_yaml = config_yaml
        self.method = method
        rank, world, accum = accelerator.process_index, accelerator.num_processes, cfg.grad_accum
        slots = [rank * accum + j for j in range(accum)]  # this process's data-parallel slots, one per micro-batch
        self.loaders = [
            ResumableLoader(rows, cfg.batch_size, seed=config.seed, process_index=s, num_processes=world * accum)
            for s in slots
        ]
        self.model = method.modules().to(accelerator.device)
        for module in method.frozen.values():
            module.eval().requires_grad_(False)
        for module in method.trainable.values():
            module.train()
        optimizer = build_optimizer(self.model.named_parameters(), cfg)
        self.scheduler = build_lr_schedule(optimizer, cfg)  # stepped here, not by Accelerate
        self._module, self.optimizer = prepare(accelerator, method, optimizer)
        # After prepare: FSDP replaces the parameters by sharded ones (in place, in self.model too).
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = EMA(self.model, cfg.ema_decay)
        self.generators = {
            _generator_name(j): torch.Generator().manual_seed(config.seed + s) for j, s in enumerate(slots)
        }
        self._step, self._elapsed_base, self._clock = 0, 0.0, time.perf_counter()
        self._last_checkpoint: Path | None = None

    @property
    def global_step(self) -> int:
        """Optimizer steps taken, the ones before a loaded checkpoint included."""
        return self._step

    @property
    def last_checkpoint(self) -> Path | None:
        """The checkpoint last saved or loaded by this trainer, or None."""
        return self._last_checkpoint

    @property
    def elapsed_s(self) -> float:
        """Training wall time: the loaded checkpoint's, plus the time since this trainer was built or loaded."""
        return self._elapsed_base + time.perf_counter() - self._clock

    def step(self, batch: TokenBatch | Sequence[TokenBatch] | None = None) -> StepStats:
        """Take one optimizer step over ``train.grad_accum`` micro-batches and return what it measured.

        Args:
            batch: this process's micro-batches for the step, each ids (B, L) int64, mask and cond_mask (B, L)
                bool: ``train.grad_accum`` TokenBatches (or one TokenBatch when it is 1). None takes them from
                :attr:`loaders`, as the training loop does; given batches leave the loaders where they are.
                Random draws come from :attr:`generators` either way.

        Returns:
            The step's measurements; :meth:`StepStats.metrics` turns them into floats.

        Raises:
            DataError: ``batch`` is not ``train.grad_accum`` TokenBatches.
            TrainingError: the loss or the gradient norm is not finite (checked before the update, so the
                weights and the checkpoints stay finite).
        """
        cfg, accelerator = self.config.train, self.accelerator
        given = None if batch is None else self._check_batches(batch)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        tokens = 0
        for j, loader in enumerate(self.loaders):
            micro = (next(loader) if given is None else given[j]).to(accelerator.device)
            with accelerator.accumulate(self._module):  # DDP and FSDP sync on the last micro-batch only
                # DDP's prepared forward is under autocast already, FSDP's is not: this gives both the same.
                with accelerator.autocast():
                    loss, metrics = self._module(micro, self.generators[_generator_name(j)])
                accelerator.backward(loss)  # divides by train.grad_accum (= Accelerate's accumulation steps)
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float64)
            tokens += micro.ids.numel()
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm is not None else float("inf")
        grad_norm = accelerator.clip_grad_norm_(self._params, max_norm)  # pre-clip total norm, unscaled under fp16
        grad_norm = sharding.full_tensor(grad_norm)  # FSDP returns it as a replicated DTensor
        # fp16: an overflow is the scaler's to handle (it skips the step and lowers the scale), not a stop.
        self._check_finite(sums["loss"], grad_norm if accelerator.scaler is None else None)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
            self.ema.update(self.model)
        self._step += 1
        means = {key: total / cfg.grad_accum for key, total in sums.items()}
        return StepStats(
            step=self._step, means=means, lr=lr, grad_norm=grad_norm, tokens=tokens * accelerator.num_processes
        )

    def _check_batches(self, batch: TokenBatch | Sequence[TokenBatch]) -> list[TokenBatch]:
        """Return the given micro-batches as a list of ``train.grad_accum`` TokenBatches.

        Raises:
            DataError: another count, or something that is not a TokenBatch.
        """
        given = [batch] if isinstance(batch, TokenBatch) else list(batch)
        accum = self.config.train.grad_accum
        if len(given) != accum or not all(isinstance(b, TokenBatch) for b in given):
            found = ", ".join(type(b).__name__ for b in given) or "nothing"
            raise DataError(
                f"Trainer.step(batch=...): expected {accum} TokenBatch micro-batch(es), one per train.grad_accum "
                f"slot, got {len(given)} ({found}); pass None to take them from the trainer's loaders"
            )
        return given

    def _check_finite(self, loss: Tensor, grad_norm: Tensor | None) -> None:
        """Raise TrainingError, on every process, when any process's loss or gradient norm is not finite."""
        loss = loss.to(self.accelerator.device)
        bad = ~torch.isfinite(loss) if grad_norm is None else ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        bad = bad.float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return
        last = self._last_checkpoint
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise TrainingError(
            f"step {self._step + 1}: non-finite loss ({float(loss) / self.config.train.grad_accum}) or gradient norm "
            f"({'not checked' if grad_norm is None else float(grad_norm)}); stopped before the update, {where}. "
            "Lower train.lr or check the data, then rerun "
            "to resume from that checkpoint"
        )

    def save(self, run_dir: str | Path | None = None) -> Path:
        """Write a checkpoint of the current step (main process, atomically) and wait for every process.

        Args:
            run_dir: the run directory; the checkpoint goes to ``run_dir/checkpoints/step-{step:08d}`` and only
                the newest ``train.keep_last`` checkpoints there are kept. None: the trainer's ``run_dir``.

        Returns:
            The checkpoint directory.

        Raises:
            TrainingError: no ``run_dir`` here nor at construction.
        """
        if run_dir is None:
            if self.run_dir is None:
                raise TrainingError("Trainer.save(): no run directory; pass one, or build the Trainer with run_dir=")
            run_dir = self.run_dir
        rng = gather_object([capture_rng_state(self.generators)])
        main = self.accelerator.is_main_process
        # Every process takes part in gathering FSDP's shards; the main process keeps the full tensors and writes.
        model_state = sharding.gather_state(self.model.state_dict(), keep=main)
        ema_state = sharding.gather_state(self.ema.state_dict(), keep=main)
        optimizer_state = sharding.gather_optimizer_state(self.optimizer.state_dict(), keep=main)
        if main:
            save_checkpoint(
                Path(run_dir),
                self._step,
                model_state=model_state,
                ema_state=ema_state,
                optimizer_state=optimizer_state,
                scheduler_state=self.scheduler.state_dict(),
                loader_state=self.loaders[0].state_dict(),
                rng_state=rng,
                config_yaml=self.config_yaml,
                keep_last=self.config.train.keep_last,
                elapsed_s=self.elapsed_s,
            )
        self.accelerator.wait_for_everyone()
        self._last_checkpoint = checkpoint_dir(Path(run_dir), self._step)
        return self._last_checkpoint

    def load(self, checkpoint: str | Path | CheckpointState) -> Path:
        """Restore model, EMA, optimizer, schedule, step, loader positions and every RNG from a checkpoint.

        Args:
            checkpoint: a checkpoint directory (``RUN_DIR/checkpoints/step-*``), a run directory (its latest
                checkpoint) or an already read :class:`~cdlm.training.checkpoint.CheckpointState`.

        Returns:
            The checkpoint directory read.

        Raises:
            CheckpointError: the checkpoint cannot be read, or does not fit the model being trained.
            DataError: its loader position does not fit the rows.
        """
        ckpt = checkpoint if isinstance(checkpoint, CheckpointState) else load_checkpoint(Path(checkpoint))
        try:
            self.model.load_state_dict(sharding.shard_state(ckpt.model_state, self.model.state_dict()), strict=True)
            self.ema.load_state_dict(ckpt.ema_state)
            self.optimizer.load_state_dict(sharding.shard_optimizer_state(ckpt.optimizer_state, self.optimizer))
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0]
            raise CheckpointError(
                f"{ckpt.path}: does not fit the model being trained ({first}); was the run trained with another "
                "model config? Train into a new --output-dir"
            ) from None
        self.scheduler.load_state_dict(ckpt.scheduler_state)
        for loader in self.loaders:  # every slot's loader is at the same epoch and position
            loader.load_state_dict(ckpt.loader_state)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if len(ckpt.rng_state) == world:
            restore_rng_state(ckpt.rng_state[rank], self.generators)
        else:
            logger.warning(
                f"{ckpt.path}: saved by {len(ckpt.rng_state)} process(es), resumed on {world}: RNGs are re-seeded, "
                "so the run continues but is not bit-identical to an uninterrupted one"
            )
        self._step, self._elapsed_base, self._clock = ckpt.step, ckpt.elapsed_s, time.perf_counter()
        self._last_checkpoint = ckpt.path
        return ckpt.path


@dataclass(frozen=True)
class StepStats:
    """One optimizer step's measurements, kept as tensors until something reads them.

    Attributes:
        step: the trainer's step count after this step.
        means: "loss" and the objective's metrics, averaged over the micro-batches (fp64, this process).
        lr: learning rate the step used (first param group).
        grad_norm: () total gradient norm before clipping.
        tokens: token positions processed by all processes.
    """

    step: int
    means: dict[str, Tensor]
    lr: float
    grad_norm: Tensor
    tokens: int

    def metrics(self) -> dict[str, float]:
        """Return this process's ``step, loss, lr, grad_norm`` and the objective's metrics as numbers."""
        return self._line({key: float(value) for key, value in self.means.items()}, {})

    def record(self, accelerator: Accelerator, tokens_per_s: float, elapsed_s: float) -> dict[str, float]:
        """Return the metrics line: the fixed keys, then the objective's metrics averaged across processes.

        A collective operation: every process must call it.
        """
        names = list(self.means)
        stacked = torch.stack([self.means[k].to(accelerator.device) for k in names])  # (metrics,) fp64
        values = accelerator.reduce(stacked, reduction="mean").tolist()
        timing = {"tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s}
        return self._line(dict(zip(names, values, strict=True)), timing)

    def _line(self, means: dict[str, float], timing: dict[str, float]) -> dict[str, float]:
        """Order a record as metrics.jsonl does: step, loss, lr, grad_norm, timing, then the objective's metrics."""
        rest = dict(means)
        fixed = {"step": self.step, "loss": rest.pop("loss"), "lr": self.lr, "grad_norm": float(self.grad_norm)}
        return {**fixed, **timing, **rest}


def _generator_name(micro_batch: int) -> str:
    """Name of the objective generator of a process's ``micro_batch``-th slot ("objective", "objective.1", …)."""
    return OBJECTIVE_GENERATOR if micro_batch == 0 else f"{OBJECTIVE_GENERATOR}.{micro_batch}"
