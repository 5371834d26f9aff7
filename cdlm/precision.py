"""The one place where the compute precision of network calls is decided (STYLE §4 dtype rules).

Parameters, gradients, optimiser state and EMA stay fp32 in every mode; only the network calls run
under the autocast returned here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]


def autocast_context(device: torch.device, precision: Precision) -> AbstractContextManager[object]:
    """Return the context to run network calls under, decided once per run and re-entered at every call.

    Args:
        device: where the networks run.
        precision: "auto" → bf16 autocast on CUDA and fp32 elsewhere; "fp32" → no autocast; "bf16" → bf16
            autocast on ``device``'s type (CPU included, when asked for explicitly).

    Returns:
        A reusable context manager: ``torch.autocast(device.type, torch.bfloat16)`` or a no-op.
    """
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
