"""How the training loop sits on Accelerate: the prepared module, the launch settings it honours or refuses.

The loop trains through :class:`TrainingModule`, an ``nn.Module`` that owns the method's trainable networks and
whose ``forward`` is the method's objective. ``accelerator.prepare`` wraps it (DDP: gradients reduced in buckets
overlapped with backward, skipped on accumulation micro-steps by ``accelerator.accumulate``; mixed precision:
autocast around ``forward``, fp16's grad scaler in ``accelerator.backward`` and unscaled before clipping).

:func:`make_accelerator` reads the launch settings (``accelerate launch`` flags and config files reach the
process as ``ACCELERATE_*`` environment variables) and stops at start, with one line naming the setting, on any
the loop cannot honour: DeepSpeed, Megatron-LM, XLA, FSDP (see :data:`UNSUPPORTED`), a dynamo backend, fp8, a
mixed precision contradicting ``train.precision``, or a gradient accumulation count other than
``train.grad_accum``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, parse_flag_from_env
from torch import Tensor, nn

from cdlm.config import TrainConfig
from cdlm.errors import TrainingError
from cdlm.interfaces import Method, TokenBatch

UNSUPPORTED = {  # launch switches the loop cannot honour, by environment variable (accelerate launch sets them)
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}
GRAD_ACCUM_ENV, PRECISION_ENV, DYNAMO_ENV = (
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_DYNAMO_BACKEND",
)


class TrainingModule(nn.Module):
    """The method's trainable networks as one module whose forward is the training objective.

    ``accelerator.prepare`` wraps this module, so DDP sees every trainable parameter and its reducer hooks run
    during ``backward``; the objective itself still calls the components directly (they are the same objects).

    Args:
        method: the built method; ``method.trainable`` become this module's children.
    """

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.networks = nn.ModuleDict(dict(method.trainable))
        self._objective = method.objective

    def forward(self, batch: TokenBatch, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        """Return the objective's ``(loss, metrics)`` on ``batch``, its random draws from ``generator``."""
        out = self._objective(batch, generator)
        return out.loss, dict(out.metrics)


def make_accelerator(cfg: TrainConfig, project_dir: str | None) -> Accelerator:
    """Create the run's Accelerator from ``train`` settings and the launch environment, refusing what is unsupported.

    Mixed precision: ``train.precision`` bf16 (or auto on CUDA) becomes Accelerate's ``bf16``; a launch setting
    of ``fp16`` or ``bf16`` is honoured when ``train.precision`` is ``auto`` (fp16 brings the grad scaler).

    Args:
        cfg: the run's ``train`` section.
        project_dir: the run directory (trackers write there), or None.

    Returns:
        The Accelerator, with ``gradient_accumulation_steps = train.grad_accum``.

    Raises:
        TrainingError: a launch setting the loop cannot honour, named in one line.
    """
    launched = os.environ.get(GRAD_ACCUM_ENV)
    if launched is not None and int(launched) != cfg.grad_accum:
        raise TrainingError(
            f"accelerate gradient_accumulation_steps={launched} ({GRAD_ACCUM_ENV}) differs from "
            f"train.grad_accum={cfg.grad_accum}: set the accumulation with --set train.grad_accum=N only"
        )
    dynamo = os.environ.get(DYNAMO_ENV, "no").lower()
    if dynamo not in ("no", "none", ""):
        raise TrainingError(
            f"accelerate dynamo_backend={dynamo} ({DYNAMO_ENV}) is not supported by cdlm train; unset it"
        )
    for key, name in UNSUPPORTED.items():
        if os.environ.get(key, "false").lower() in ("1", "true", "yes"):
            raise TrainingError(
                f"accelerate {name} ({key}) is not supported by cdlm train; use recipes/accelerate/ddp.yaml"
            )
    state = process_state()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != world:
        raise TrainingError(
            f"launched as WORLD_SIZE={world} processes but Accelerate set up {state.num_processes} "
            f"({state.distributed_type.value}): launch with accelerate launch or torchrun"
        )
    if state.distributed_type == DistributedType.XLA:
        raise TrainingError("accelerate distributed_type=XLA (TPU) is not supported by cdlm train")
    # Accelerate keeps one AcceleratorState per process: each run (stage, API call) sets its own precision and
    # accumulation; the process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    # Objectives may leave a network out of a step (a decoder loss drawn with some probability): DDP must look.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(
        cpu=state.device.type == "cpu",
        mixed_precision=_mixed_precision(cfg, state.device),
        gradient_accumulation_steps=cfg.grad_accum,
        kwargs_handlers=[ddp],
        log_with=list(cfg.trackers) or None,
        project_dir=project_dir,
    )


def process_state() -> PartialState:
    """Return Accelerate's process state, set up as a gloo CPU worker where no GPU is present.

    Accelerate makes a process launched by torchrun a distributed CPU worker only when told ``cpu=True``;
    otherwise it silently runs it as a lone process. A state created earlier without that is replaced. Code
    that needs the process layout before training (data preparation) should call this.
    """
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != world:  # a wrong state (an existing process group is reused, not re-created)
        PartialState._reset_state()
        state = PartialState(cpu=cpu)
    return state


def shutdown() -> None:
    """End a distributed launch cleanly: every process reaches a barrier, then the process group is destroyed.

    Call it once, when the process is done training (``cdlm train`` does): a gloo worker that exits while its
    peers still hold the group can leave them waiting at exit.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _mixed_precision(cfg: TrainConfig, device: torch.device) -> str:
    """Return Accelerate's mixed precision for this run: "no", "bf16" or "fp16" (launch setting, auto only).

    Raises:
        TrainingError: the launch setting is fp8 or contradicts an explicit ``train.precision``.
    """
    wanted = "bf16" if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda") else "no"
    launched = os.environ.get(PRECISION_ENV, "no").lower()
    if launched == "no" or launched == wanted:
        return wanted
    if launched in ("fp16", "bf16") and cfg.precision == "auto":
        return launched
    raise TrainingError(
        f"accelerate mixed_precision={launched} ({PRECISION_ENV}) contradicts train.precision={cfg.precision}: "
        "set one of them (train.precision=auto follows the launch setting for fp16 and bf16)"
    )
