"""How the training loop sits on Accelerate: the prepared module, the launch settings it honours or refuses.

The loop trains through :class:`TrainingModule`, an ``nn.Module`` that owns the method's trainable networks and
whose ``forward`` is the method's objective. ``accelerator.prepare`` wraps it (DDP: gradients reduced in buckets
overlapped with backward, skipped on accumulation micro-steps by ``accelerator.accumulate``; mixed precision:
autocast around ``forward``, fp16's grad scaler in ``accelerator.backward`` and unscaled before clipping).

FSDP is FSDP2 (``torch.distributed.fsdp.fully_shard`` through Accelerate, ``fsdp_version: 2``): parameters,
gradients, optimizer state and EMA are sharded by rows across processes. With ``NO_WRAP`` (the shipped
config) the trainable networks are one unit, gathered whole for the objective's call: any method trains so.
With ``TRANSFORMER_BASED_WRAP`` and no class list, every block a trainable network holds in an ``nn.ModuleList``
is its own unit (see :meth:`TrainingModule.block_classes`), gathered for its own forward and backward only:
``fsdp_reshard_after_forward: true`` is full shard, ``false`` shard-grad-op. That needs an objective that uses
a block's weights in the block's forward only (checked: ELF's flow stage, Cola's vae stage; not ELF's encoder
stage, which reads the T5 bias from the first block, nor Cola's joint stage, whose reference VAE copies the
VAE's weights); the others stop with a one-line error. Every process must run every unit each step (FSDP
gathers a unit in its forward, on all processes together); a parameter left out of a step on some processes
is reduced as zero, as DDP's ``find_unused_parameters`` does (:func:`prepare`). Parameters and gradients stay
fp32 (the policy casts nothing) and mixed precision is the same autocast as without FSDP, so a sharded run
equals a DDP run to fp32 rounding. Accelerate enables FSDP for accelerator devices only, although torch's
FSDP2 runs on gloo CPU workers: :func:`make_accelerator` switches a multi-process CPU run to FSDP itself, so
the CPU tests run the GPU path.

:func:`make_accelerator` reads the launch settings (``accelerate launch`` flags and config files reach the
process as ``ACCELERATE_*`` and ``FSDP_*`` environment variables) and stops at start, with one line naming the
setting, on any the loop cannot honour: DeepSpeed, Megatron-LM, XLA (see :data:`UNSUPPORTED`), FSDP1, FSDP
parameter offload, size-based wrapping or a sharded state-dict type (see :func:`fsdp_plugin`), a dynamo
backend, fp8, a mixed precision contradicting ``train.precision``, or a gradient accumulation count other than
``train.grad_accum``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    parse_flag_from_env,
)
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.optim import Optimizer

from cdlm.config import TrainConfig
from cdlm.errors import TrainingError
from cdlm.interfaces import Method, TokenBatch

UNSUPPORTED = {  # launch switches the loop cannot honour, by environment variable (accelerate launch sets them)
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}
GRAD_ACCUM_ENV, PRECISION_ENV, DYNAMO_ENV, FSDP_ENV = (
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "ACCELERATE_MIXED_PRECISION",
    "ACCELERATE_DYNAMO_BACKEND",
    "ACCELERATE_USE_FSDP",
)
FSDP_CONFIG = "recipes/accelerate/fsdp.yaml"


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
        # Accelerate's TRANSFORMER_BASED_WRAP reads this name when the launch config lists no classes.
        self._no_split_modules = self.block_classes()

    def block_classes(self) -> list[str]:
        """Return the class names of the blocks the networks repeat: modules with children in an ``nn.ModuleList``.

        Under FSDP each such block is its own unit, gathered for its own forward and backward only. A block is
        only ever called through its ``forward`` (FSDP gathers it there); leaves (a list of ``nn.Linear``) are
        not blocks, so a weight read directly elsewhere is never left sharded.
        """
        lists = [m for m in self.networks.modules() if isinstance(m, nn.ModuleList)]
        return sorted({type(block).__name__ for blocks in lists for block in blocks if next(block.children(), None)})

    def forward(self, batch: TokenBatch, generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        """Return the objective's ``(loss, metrics)`` on ``batch``, its random draws from ``generator``.

        Raises:
            TrainingError: under FSDP with per-block units, the objective read a block's weights outside that
                block's forward (they are sharded there).
        """
        try:
            out = self._objective(batch, generator)
        except RuntimeError as err:
            if "DTensor" not in str(err):
                raise
            raise TrainingError(
                "FSDP: the objective reads a block's weights outside that block's forward, where they are sharded "
                f"({str(err).splitlines()[0][:100]}); launch with fsdp_auto_wrap_policy: NO_WRAP, as {FSDP_CONFIG} "
                "does: it gathers every weight for the whole step"
            ) from err
        return out.loss, dict(out.metrics)


def prepare(accelerator: Accelerator, method: Method, optimizer: Optimizer) -> tuple[nn.Module, Optimizer]:
    """Wrap the method's trainable networks (:class:`TrainingModule`) and their optimizer for this launch.

    An objective may leave a parameter out of a step on some processes (a loss drawn with some probability):
    DDP looks for such parameters (``find_unused_parameters``, see :func:`make_accelerator`) and FSDP reduces
    zeros for them, so that every process takes part in the same reductions.

    Returns:
        The prepared module (DDP, FSDP or as is on one process) and the prepared optimizer.
    """
    module, optimizer = accelerator.prepare(TrainingModule(method), optimizer)
    if isinstance(module, FSDPModule):
        module.set_reduce_scatter_unused_params(True)
    return module, optimizer


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
        if _flag(key):
            raise TrainingError(
                f"accelerate {name} ({key}) is not supported by cdlm train; use recipes/accelerate/ddp.yaml "
                f"or {FSDP_CONFIG}"
            )
    fsdp = fsdp_plugin() if _flag(FSDP_ENV) else None
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
    accelerator = Accelerator(
        cpu=state.device.type == "cpu",
        mixed_precision=_mixed_precision(cfg, state.device),
        gradient_accumulation_steps=cfg.grad_accum,
        kwargs_handlers=[ddp],
        fsdp_plugin=fsdp,
        log_with=list(cfg.trackers) or None,
        project_dir=project_dir,
    )
    if fsdp is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate keeps gloo CPU workers on DDP even when FSDP is asked for, though torch's FSDP2 runs there:
        # set what AcceleratorState.__init__ sets for accelerator devices (both shared states, or the next
        # AcceleratorState() copies the process state's type back).
        accelerator.state.fsdp_plugin = fsdp
        accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """Return Accelerate's FSDP plugin from the launch's ``FSDP_*`` settings, refusing those cdlm cannot honour.

    The mixed-precision policy casts nothing (parameters, gradients and their reduction stay fp32); bf16 comes
    from the same autocast as without FSDP.

    Raises:
        TrainingError: FSDP1 (``fsdp_version`` other than 2), parameter offload, size-based wrapping, or a
            state-dict type other than ``FULL_STATE_DICT`` (cdlm checkpoints always hold the full weights in
            safetensors), in one line.
    """
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise TrainingError(
            f"accelerate fsdp_version={version} (FSDP_VERSION) is not supported by cdlm train: FSDP1 needs a GPU and "
            f"flat parameters; set fsdp_version: 2 as {FSDP_CONFIG} does"
        )
    if _flag("FSDP_OFFLOAD_PARAMS"):
        raise TrainingError(
            "accelerate fsdp_offload_params=true (FSDP_OFFLOAD_PARAMS) is not supported by cdlm train "
            "(Muon and the EMA keep their shards on the GPU); set fsdp_offload_params: false"
        )
    if os.environ.get("FSDP_AUTO_WRAP_POLICY", "NO_WRAP").upper() == "SIZE_BASED_WRAP":
        raise TrainingError(
            "accelerate fsdp_auto_wrap_policy=SIZE_BASED_WRAP (FSDP_AUTO_WRAP_POLICY) is not supported by cdlm train "
            "(it would shard containers that are never called, and modules used outside their forward); set "
            "TRANSFORMER_BASED_WRAP (each repeated block) or NO_WRAP"
        )
    state_dict_type = os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    if state_dict_type != "FULL_STATE_DICT":
        raise TrainingError(
            f"accelerate fsdp_state_dict_type={state_dict_type} (FSDP_STATE_DICT_TYPE) is not supported by cdlm "
            "train: its checkpoints always hold the full weights (safetensors, loadable on one process); set "
            "fsdp_state_dict_type: FULL_STATE_DICT"
        )
    return FullyShardedDataParallelPlugin(mixed_precision_policy=MixedPrecisionPolicy())


def process_state() -> PartialState:
    """Return Accelerate's process state, set up as a gloo CPU worker where no GPU is present.

    Accelerate makes a process launched by torchrun a distributed CPU worker only when told ``cpu=True``;
    otherwise it silently runs it as a lone process. A state created earlier without that is replaced. Code
    that needs the process layout before training (data preparation) should call this.
    """
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # A wrong state, or one an earlier run's Accelerator marked FSDP (a new Accelerator would then not set up
    # FSDP again): set it up anew; an existing process group is reused, not re-created.
    if state.num_processes != world or state.distributed_type == DistributedType.FSDP:
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


def _flag(key: str) -> bool:
    """Return whether the environment variable ``key`` is set to a true value (``1``, ``true``, ``yes``)."""
    return os.environ.get(key, "false").lower() in ("1", "true", "yes")


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
