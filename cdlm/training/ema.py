"""Exponential moving average of the trainable weights (ELF spec §3.5); sampling and evaluation use it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from cdlm.errors import CheckpointError
from cdlm.training.sharding import shard_like


def _check_names(expected: Iterable[str], found: Iterable[str], where: str) -> None:
    """Raise CheckpointError naming missing and unexpected parameter names."""
    expected, found = set(expected), set(found)
    if expected != found:
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        raise CheckpointError(
            f"{where}: EMA parameter names do not match; missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}). Was the EMA built for another model?"
        )


class EMA:
    """fp32 shadow copies of a model's trainable parameters, keyed by parameter name.

    Initialised to the current parameters; after every optimizer step :meth:`update` moves each shadow
    toward its parameter: ``ema ← ema + (1 − decay)·(p − ema)``. Under FSDP the shadows are sharded as the
    parameters are (``DTensor``); :meth:`state_dict` returns them so (the trainer gathers them to save), and
    :meth:`load_state_dict` takes full tensors.

    Args:
        model: the module whose trainable (``requires_grad``) parameters are averaged.
        decay: the EMA decay, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in self._trainable(model)
        }

    @staticmethod
    def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move every shadow toward the model's current parameter by ``1 − decay``."""
        for name, p in self._trainable(model):
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """Return {parameter name: fp32 shadow tensor} (the reference's ``ema_params1`` layout)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load shadows saved by :meth:`state_dict`, whole (strict: same names and shapes).

        Raises:
            CheckpointError: names or shapes differ from this EMA's.
        """
        _check_names(self.shadow, state, "EMA.load_state_dict")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise CheckpointError(
                    f"EMA.load_state_dict: {name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(self.shadow[name].shape)}"
                )
            self.shadow[name].copy_(shard_like(value, self.shadow[name]))  # this process's shard under FSDP

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters with the EMA weights.

        Raises:
            CheckpointError: the model's trainable parameter names differ from the EMA's.
        """
        params = self._trainable(model)
        _check_names(self.shadow, (name for name, _ in params), "EMA.copy_to")
        for name, p in params:
            p.copy_(self.shadow[name])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with EMA weights inside the ``with`` block; the training weights come back afterwards."""
        backup = {name: p.detach().clone() for name, p in self._trainable(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in self._trainable(model):
                    p.copy_(backup[name])
