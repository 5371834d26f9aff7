from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from cdlm.config import TrainConfig
from cdlm.errors import RecipeError
from cdlm.training.optim import Muon, build_lr_schedule, build_optimizer, lr_factor, newton_schulz


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 4), nn.LayerNorm(4))


def _set_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_newton_schulz_orthogonalises(shape: tuple[int, int]) -> None:
    u = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    o = newton_schulz(u)
    assert o.shape == shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    # the quintic NS5 map leaves singular values in a band around 1 (≈[0.7, 1.2]) instead of exactly 1
    assert s.min() > 0.6 and s.max() < 1.25
    # singular vectors are those of u: o ≈ U·f(S)·Vᵀ, so projecting onto u's SVD basis is diagonal
    uu, _, vh = torch.linalg.svd(u, full_matrices=False)
    core = uu.T @ o @ vh.T
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 1e-4


def _relative_to_fp64(out: Tensor, x: Tensor) -> float:
    """Relative Frobenius distance of an NS result from the direct iteration run in fp64."""
    exact = newton_schulz(x.double(), side="direct").double()
    return float((out.double() - exact).norm() / exact.norm())


@pytest.mark.parametrize("shape", [(2048, 96), (96, 2048)])
def test_newton_schulz_gram_side_matches_direct(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(4)
    gauss = torch.randn(shape, generator=gen)
    low, high = min(shape), max(shape)
    factors = torch.randn(low, 8, generator=gen) @ torch.randn(8, high, generator=gen)  # rank 8
    ill = (factors if shape[0] == low else factors.T) + 0.01 * torch.randn(shape, generator=gen)
    for u, bound in ((gauss, 4e-6), (ill, 1e-4)):  # the bounds stated in newton_schulz's docstring
        gram = newton_schulz(u, side="gram")
        assert gram.shape == shape
        assert _relative_to_fp64(gram, u) < bound
        assert _relative_to_fp64(newton_schulz(u, side="auto"), u) < bound  # aspect ≥ 4: auto is the Gram side


def test_muon_first_step_by_hand() -> None:
    w = nn.Parameter(torch.randn(8, 3, generator=torch.Generator().manual_seed(2)))
    g = torch.randn(8, 3, generator=torch.Generator().manual_seed(3))
    w0 = w.detach().clone()
    opt = Muon([w], [], lr=0.1, momentum=0.9, weight_decay=0.5)
    w.grad = g.clone()
    opt.step()
    # t = 1, m1 = (1 − β)·g; u = β·m1/(1 − β²) + (1 − β)·g/(1 − β) = (0.09/0.19 + 1)·g
    u = (0.9 * 0.1 / (1 - 0.81) + 1.0) * g
    x = (u / (u.norm() + 1e-8)).T  # tall (8, 3): iterate on the (3, 8) transpose
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    expected = w0 * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(8 / 3) * x.T
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], 0.1 * g, atol=1e-7, rtol=0)
    assert opt.state[w]["step"] == 1


def test_adam_group_first_two_steps_by_hand() -> None:
    b = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    g1, g2 = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([-0.4, 0.0, 0.2])
    opt = Muon([], [b], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    expected = b.detach().clone()
    mu, nu = torch.zeros(3), torch.zeros(3)
    for t, g in enumerate((g1, g2), start=1):
        b.grad = g.clone()
        opt.step()
        mu, nu = 0.9 * mu + 0.1 * g, 0.999 * nu + 0.001 * g * g
        mu_hat = 0.9 * mu / (1 - 0.9 ** (t + 1)) + 0.1 * g / (1 - 0.9**t)
        expected = expected - 0.01 * mu_hat / ((nu / (1 - 0.999**t)).sqrt() + 1e-8)
        torch.testing.assert_close(b.detach(), expected, atol=1e-7, rtol=0)


def test_missing_grad_is_zero_filled() -> None:
    w, b = nn.Parameter(torch.ones(4, 4)), nn.Parameter(torch.ones(4))
    opt = Muon([w], [b], lr=0.1)
    opt.step()  # no grads: zero gradients, the state still advances, the weights do not move
    assert opt.state[w]["step"] == 1 and opt.state[b]["step"] == 1
    assert torch.equal(w.detach(), torch.ones(4, 4)) and torch.equal(b.detach(), torch.ones(4))


def test_state_dict_round_trip_continues_identically() -> None:
    cfg = TrainConfig(lr=0.01, steps=10, warmup_steps=2, lr_schedule="cosine")
    model = _model()
    opt = build_optimizer(model.named_parameters(), cfg)
    sched = build_lr_schedule(opt, cfg)
    for i in range(3):
        _set_grads(model, i)
        opt.step()
        sched.step()
    clone = copy.deepcopy(model)
    opt2 = build_optimizer(clone.named_parameters(), cfg)
    sched2 = build_lr_schedule(opt2, cfg)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched2.load_state_dict(sched.state_dict())
    assert [g["use_muon"] for g in opt2.param_groups] == [True, False]
    for i in range(3, 6):
        for m, o, s in ((model, opt, sched), (clone, opt2, sched2)):
            _set_grads(m, i)
            o.step()
            s.step()
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


def test_build_optimizer_groups_and_adamw() -> None:
    model = _model()
    model[3].weight.requires_grad_(False)
    opt = build_optimizer(model.named_parameters(), TrainConfig())
    assert [len(g["params"]) for g in opt.param_groups] == [2, 3]  # two Linear weights; two biases + LN bias
    adamw = build_optimizer(model.named_parameters(), TrainConfig(optimizer="adamw", weight_decay=0.1))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(RecipeError, match=r"0\.weight \(torch\.float64\)"):
        build_optimizer(model.double().named_parameters(), TrainConfig())


def test_lr_schedule_values() -> None:
    cfg = TrainConfig(lr=1.0, steps=14, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_factor(14, cfg) == pytest.approx(0.1) and lr_factor(20, cfg) == pytest.approx(0.1)
    linear = cfg.model_copy(update={"lr_schedule": "linear"})
    assert lr_factor(9, linear) == pytest.approx(0.55) and lr_factor(14, linear) == pytest.approx(0.1)
    assert lr_factor(0, TrainConfig()) == 1.0 and lr_factor(999, TrainConfig()) == 1.0  # no warm-up, constant
    opt = build_optimizer(_model().named_parameters(), cfg)
    sched = build_lr_schedule(opt, cfg)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0]
