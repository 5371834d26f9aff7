"""Training times are the scripts' own τ, bit for bit: no round trip through core time (spec §5, §9.2).

The scripts draw ``u = randn(B)`` and ``τ = sigmoid(loc + scale·u)`` (or ``τ = rand(B)``) in Cola time and feed
the DiT ``T·τ``; ``1 − (1 − τ)`` would drop the low bits of every τ < 0.5.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import cdlm
from cdlm.interfaces import TokenBatch
from cdlm_cola.objective import ColaObjective
from cdlm_cola.objective_flow import NOISY, two_layout
from cdlm_cola.schedule import ColaSchedule

ROWS, LENGTH, SEED = 512, 4, 1234
TIMES = [("logit_normal", 0.0, 1.0), ("logit_normal", 1.0, 1.0), ("logit_normal", 0.3, 0.7), ("uniform", 0.0, 1.0)]


def objective(distribution: str, loc: float, scale: float) -> ColaObjective:
    """The tiny recipe's objective, built by the plugin: DiT stage on the posterior mode (no posterior noise)."""
    fields = {"stage": "dit", "vae_mode": "mode", "prompt_block_prob": 0.0, "time_distribution": distribution}
    overrides = [f"model.{k}={v}" for k, v in {**fields, "t_loc": loc, "t_scale": scale}.items()]
    obj = cdlm.build(cdlm.load_recipe("cola-tiny", overrides)).objective
    assert isinstance(obj, ColaObjective)
    return obj


def token_rows() -> TokenBatch:
    ids = torch.randint(3, 100, (ROWS, LENGTH), generator=torch.Generator().manual_seed(0))
    return TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool))


def scripts_tau(obj: ColaObjective, distribution: str, loc: float, scale: float) -> Tensor:
    """Replay the objective's draw order from an identically seeded generator, computing τ as the scripts do."""
    g = torch.Generator().manual_seed(SEED)
    torch.multinomial(obj.block_size_probs, ROWS, replacement=True, generator=g)  # block sizes come first
    if distribution == "uniform":
        return torch.rand(ROWS, generator=g)
    u = torch.randn(ROWS, generator=g)  # the scripts' sample_timestep
    return torch.sigmoid(loc + scale * u)


@pytest.mark.parametrize(("distribution", "loc", "scale"), TIMES)
def test_draw_gives_the_scripts_tau_bit_for_bit(distribution: str, loc: float, scale: float) -> None:
    obj = objective(distribution, loc, scale)
    draws = obj.draw(token_rows(), torch.Generator().manual_seed(SEED))
    assert draws.vae.posterior_eps is None
    expected = scripts_tau(obj, distribution, loc, scale)
    assert draws.t.dtype == torch.float32
    assert torch.equal(draws.t, expected)
    # the old path, 1 − (1 − τ), loses bits of logit-normal draws, so this test catches it (uniform draws are
    # multiples of 2⁻²⁴, for which the round trip happens to be exact)
    lossy = 1 - (1 - expected) != expected
    assert lossy.any() == (distribution == "logit_normal")
    assert (expected[lossy] < 0.5).all()
    # the core-time draw is the same draw, converted once
    core = ColaSchedule(obj.cfg).sample_t(ROWS, torch.Generator().manual_seed(7))
    assert torch.equal(core, 1 - obj.schedule.sample_tau(ROWS, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize(("distribution", "loc", "scale"), TIMES[:2])
def test_noisy_latents_and_dit_timesteps_are_the_scripts(distribution: str, loc: float, scale: float) -> None:
    obj = objective(distribution, loc, scale)
    draws = obj.draw(token_rows(), torch.Generator().manual_seed(SEED))
    tau, z1 = draws.t, draws.eps.split(LENGTH)  # every row has LENGTH latents
    g = torch.Generator().manual_seed(5)
    z0 = [torch.randn(z.shape, generator=g) for z in z1]
    states, valid = torch.full((ROWS * LENGTH,), NOISY), torch.ones(ROWS * LENGTH, dtype=torch.bool)
    lay = two_layout(torch.cat(z0), draws.eps, tau, states, valid, [LENGTH] * ROWS, [LENGTH] * ROWS, obj.schedule)
    noisy_half = torch.cat([torch.arange(2 * z.shape[0]) >= z.shape[0] for z in z0])
    # the scripts, per sample: t_val = t[i].item() (a Python float), (1 − t_val)·z_0 + t_val·z_1, full(T·t_val)
    t_vals = tau.tolist()
    expected_noisy = torch.cat([(1 - t) * a + t * b for t, a, b in zip(t_vals, z0, z1, strict=True)])
    expected_time = torch.cat([torch.full((LENGTH,), t * obj.cfg.time_scale) for t in t_vals])
    assert torch.equal(lay.txt[noisy_half], expected_noisy)
    assert torch.equal(lay.timestep[noisy_half], expected_time)
