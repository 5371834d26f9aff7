from __future__ import annotations

import pytest
import torch

from cdlm.precision import autocast_context


@pytest.mark.parametrize(
    ("precision", "dtype"), [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_cpu_autocast_choice(precision: str, dtype: torch.dtype) -> None:
    ctx = autocast_context(torch.device("cpu"), precision)
    for _ in range(2):  # decided once, entered many times
        with ctx:
            out = torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3))
        assert out.dtype == dtype
