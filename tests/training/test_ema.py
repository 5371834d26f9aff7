from __future__ import annotations

import pytest
import torch
from torch import nn

from cdlm.errors import CheckpointError
from cdlm.training.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].bias.requires_grad_(False)  # frozen parameters are not averaged
    return model


def test_update_is_lerp_toward_parameters() -> None:
    model = _model()
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.9)
    assert set(ema.state_dict()) == {"0.weight", "0.bias", "1.weight"}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    ema.update(model)
    for name, shadow in ema.state_dict().items():
        # two updates toward p0 + 1: ema = p0 + (1 − 0.9²)·1
        torch.testing.assert_close(shadow, p0[name] + 0.19, atol=1e-6, rtol=0)
        assert shadow.dtype == torch.float32


def test_applied_swaps_and_restores() -> None:
    model = _model()
    ema = EMA(model, decay=0.5)
    trained = {n: p.detach().clone() + 2.0 for n, p in model.named_parameters()}
    model.load_state_dict(trained)
    ema.update(model)
    with ema.applied(model) as m:
        torch.testing.assert_close(m[0].weight, trained["0.weight"] - 1.0)
        torch.testing.assert_close(m[1].bias, trained["1.bias"])  # frozen: untouched
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name])
    ema.copy_to(model)
    torch.testing.assert_close(model[0].bias, trained["0.bias"] - 1.0)


def test_state_dict_round_trip_and_strictness() -> None:
    model = _model()
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ema.update(model)
    other = EMA(_model(), decay=0.99)
    other.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    for name, value in ema.state_dict().items():
        assert torch.equal(other.state_dict()[name], value)
    with pytest.raises(CheckpointError, match=r"missing \['1.weight'\]"):
        other.load_state_dict({k: v for k, v in ema.state_dict().items() if k != "1.weight"})
    with pytest.raises(CheckpointError, match=r"0.bias has shape \(5,\)"):
        other.load_state_dict({**ema.state_dict(), "0.bias": torch.zeros(5)})
    with pytest.raises(CheckpointError, match="unexpected"):
        other.copy_to(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)))
