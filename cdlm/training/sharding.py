"""Full tensors from FSDP2's sharded ones and back: what checkpoints, EMA and Muon need under FSDP.

Under FSDP2 every parameter of a prepared module is a ``DTensor`` holding this process's shard (dim 0), and so
are the gradients, the optimizer state and the EMA shadows made from them. Checkpoints hold full tensors in
our safetensors format, so one process (``cdlm sample``) can read them: :func:`gather_state` assembles each
tensor from its shards before saving, :func:`shard_state` cuts a full one back to this process's shard when
loading. Without FSDP nothing is a ``DTensor`` and these functions return their input unchanged.

Gathering is a collective operation: every process calls it, with the same keys in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer


def full_tensor(value: Tensor) -> Tensor:
    """Return ``value`` whole: a sharded ``DTensor`` is gathered from every process (collective), else as is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """Return this process's shard of the full tensor ``value``, laid out as ``like`` is.

    Every process holds the same full ``value``, so each keeps its own piece without communication.

    Args:
        value: the full tensor, any device.
        like: the tensor it will replace: a ``DTensor`` (sharded) or a plain tensor.

    Returns:
        A ``DTensor`` with ``like``'s mesh and placements on ``like``'s device; ``value`` itself when ``like`` is
        not a ``DTensor`` or the shapes differ (the caller's shape check then reports the mismatch).
    """
    if not isinstance(like, DTensor) or value.shape != like.shape:
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def gather_state(state: Mapping[str, Any], *, keep: bool) -> dict[str, Any]:
    """Gather every tensor of a state dict whole, one at a time, onto the CPU (collective).

    Args:
        state: {name: tensor, sharded DTensor, or a non-tensor value (kept as it is)}.
        keep: whether this process keeps the result (the main process, which writes the checkpoint); the others
            take part in the gathering and drop each tensor at once.

    Returns:
        {name: full detached CPU tensor (or the non-tensor value)}, or {} when ``keep`` is False.
    """
    out = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            value = full_tensor(value).detach()
        if keep:
            out[key] = value.cpu() if isinstance(value, Tensor) else value
    return out


def shard_state(state: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return ``state`` (full tensors) with every entry that ``like`` holds sharded cut to this process's shard."""
    return {key: shard_like(value, like[key]) if key in like else value for key, value in state.items()}


def gather_optimizer_state(state: Mapping[str, Any], *, keep: bool) -> dict[str, Any]:
    """Gather an ``optimizer.state_dict()`` whole (collective); see :func:`gather_state` for ``keep``.

    Returns:
        The same layout with every tensor full on the CPU (no per-parameter state when ``keep`` is False).
    """
    per_param = {idx: gather_state(values, keep=keep) for idx, values in state["state"].items()}
    return {"state": per_param if keep else {}, "param_groups": state["param_groups"]}


def shard_optimizer_state(state: Mapping[str, Any], optimizer: Optimizer) -> dict[str, Any]:
    """Cut a full ``optimizer.state_dict()`` to this process's shards, ready for ``optimizer.load_state_dict``.

    The state of parameter i (numbered across param groups, as ``state_dict`` numbers them) is cut like that
    parameter; ``step`` counters stay whole, as ``torch.optim`` keeps them.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {
        idx: {
            key: shard_like(value, params[int(idx)])
            if isinstance(value, Tensor) and key != "step" and int(idx) < len(params)
            else value
            for key, value in values.items()
        }
        for idx, values in state["state"].items()
    }
    return {"state": sharded, "param_groups": state["param_groups"]}
