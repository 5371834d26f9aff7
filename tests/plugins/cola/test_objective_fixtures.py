"""DiT-only objective parity with the community scripts' training fixtures (Cola spec §9.2, fixtures ``train_fp32``).

Every case is replayed from its recorded draws (torch and Python ``random`` alike, in call order), turned into
:class:`ColaDraws`: the noisy-copy construction, the DiT call (inputs and output) and the loss are compared at
1e-5. Pretraining cases also run the whole :meth:`ColaObjective.loss` on the token rows; SFT cases (synthetic
rows with per-token roles) are checked at the function level from the recorded ``z0``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from cdlm.interfaces import TokenBatch
from cdlm_cola.config import ColaConfig
from cdlm_cola.dit import ColaDiT
from cdlm_cola.objective import ColaDraws, ColaObjective
from cdlm_cola.objective_flow import NOISY, role_states, two_layout, with_prompt_blocks
from cdlm_cola.objective_vae import VaeDraws
from cdlm_cola.schedule import ColaSchedule
from cdlm_cola.state_dict import load_pretrained_dit, load_pretrained_vae
from cdlm_cola.vae import ColaTextVAE, posterior
from conftest import shared_path
from parity import pin_reference_sinusoid, reference_sigmoid

ATOL = 1e-5
PRETRAIN_CASES = ["pretrain_sample_promptblocks", "pretrain_mode_uniform", "cpt_sample_loc0"]
SFT_CASES = ["sft_token_boundary", "sft_block_boundary_all_token"]


def close(actual: Tensor, expected: Tensor, rtol: float = 0.0) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=rtol)


@pytest.fixture(scope="module")
def fx() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = load_file(shared_path("fixtures", "cola", "train_fp32.safetensors"))
    return tensors, json.loads(shared_path("fixtures", "cola", "train_fp32.json").read_text())


@pytest.fixture(scope="module")
def vae() -> ColaTextVAE:
    return load_pretrained_vae(shared_path("fixtures", "cola", "cola_vae"))


@pytest.fixture()
def dit() -> ColaDiT:
    return load_pretrained_dit(shared_path("fixtures", "cola", "cola_dit"))


@pytest.fixture(autouse=True)
def _reference_time_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    pin_reference_sinusoid(monkeypatch)  # the DiT embeds t ≤ 1000 as the fixture machine did, on any CPU (parity.py)


class Case:
    """One recorded training step: its settings, tensors and a cursor over its draws in call order."""

    def __init__(self, fx: tuple[dict[str, Tensor], dict[str, Any]], name: str) -> None:
        tensors, meta = fx
        self.prefix = f"train/{name}/"
        self.t = {k[len(self.prefix) :]: v for k, v in tensors.items() if k.startswith(self.prefix)}
        self.meta = {k[len(self.prefix) :]: v for k, v in meta.items() if k.startswith(self.prefix)}
        self.settings = self.meta["settings"]
        self._draws: Iterator[str] = iter(sorted(k for k in self.t if k.startswith("randoms/")))

    def next(self, kind: str) -> Tensor:
        key = next(self._draws)
        assert key.split("_", 1)[1].startswith(kind), f"{key}: expected a {kind} draw"
        return self.t[key]

    def config(self, vae: ColaTextVAE, dit: ColaDiT, **extra: Any) -> ColaConfig:
        s = self.settings
        return ColaConfig(
            vae=vae.config,
            dit=dit.config,
            stage="dit",
            pad_id=s["STOP_TOKEN_ID"],
            time_distribution=s["timestep_dist"],
            t_loc=s["logit_normal_loc"],
            t_scale=s["logit_normal_scale"],
            block_sizes=s["BLOCK_SIZES"],
            block_size_probs=s["BLOCK_SIZE_PROBS"],
            vae_mode=s["vae_mode"],
            **extra,
        )

    def replay(self, cfg: ColaConfig, n_samples: int) -> ColaDraws:
        """Turn the recorded draws into ColaDraws (the scripts' order: per sample block size + posterior noise,
        the times, then per sample z_1 and the Python draws of its prompt blocks)."""
        index, eps = [], []
        for _ in range(n_samples):
            index.append(int(self.next("multinomial")))
            if cfg.vae_mode == "sample":
                eps.append(self.next("randn"))
        raw = self.next("rand" if cfg.time_distribution == "uniform" else "randn")
        # σ is amplified ×1000 into the DiT time: its fixture-machine rounding, not this CPU's (parity.py)
        tau = raw if cfg.time_distribution == "uniform" else reference_sigmoid(cfg.t_loc + cfg.t_scale * raw)
        z1, use, split = [], [], []
        for i in range(n_samples):
            z1.append(self.next("randn_like"))
            bs = cfg.block_sizes[index[i]]
            n_blocks = z1[-1].shape[0] // bs
            u, s = torch.ones(n_blocks), torch.ones(n_blocks, dtype=torch.long)  # u = 1: never a prompt block
            for b in range(n_blocks if cfg.prompt_block_prob > 0 and bs > 1 else 0):
                u[b] = float(self.next("py_random"))
                if u[b] < cfg.prompt_block_prob:
                    s[b] = int(self.next("py_randint"))
            use.append(u)
            split.append(s)
        assert next(self._draws, None) is None, "draws left over"
        prompts = cfg.prompt_block_prob > 0
        return ColaDraws(
            t=tau,
            eps=torch.cat(z1),
            block_index=torch.tensor(index),
            vae=VaeDraws(eps or None, None, None),
            prompt_use=use if prompts else None,
            prompt_split=split if prompts else None,
        )

    def check_layout_and_loss(self, cfg: ColaConfig, dit: ColaDiT, draws: ColaDraws, cond: list[Tensor]) -> None:
        """Rebuild the noisy copies from the recorded z0, compare them, the DiT call and the loss."""
        z0 = [self.t[f"in/z0_{i}"] for i in range(len(cond))]
        sizes = [cfg.block_sizes[i] for i in draws.block_index.tolist()]
        unpadded = self.meta.get("in/unpadded_len", [self.settings.get("row_len") or z.shape[0] for z in z0])
        states, valid = [], []
        for i, (c, bs) in enumerate(zip(cond, sizes, strict=True)):
            s = role_states(c, bs, cfg.loss_mode, cfg.boundary_mode)
            if draws.prompt_use is not None and draws.prompt_split is not None:
                s = with_prompt_blocks(s, bs, draws.prompt_use[i], draws.prompt_split[i], cfg.prompt_block_prob)
            states.append(s)
            valid.append(torch.arange(z0[i].shape[0]) < unpadded[i])
        lens = [z.shape[0] for z in z0]
        batch = two_layout(
            torch.cat(z0), draws.eps, draws.t, torch.cat(states), torch.cat(valid), lens, sizes, ColaSchedule(cfg)
        )
        n = batch.seq_lens
        noisy_rows = torch.cat([torch.arange(2 * k) >= k for k in n])
        close(batch.txt[noisy_rows], torch.cat([self.t[f"noisy/z_noisy_{i}"] for i in range(len(n))]))
        close(batch.timestep[noisy_rows], torch.cat([self.t[f"noisy/ts_noisy_{i}"] for i in range(len(n))]))
        close(batch.target, torch.cat([self.t[f"noisy/target_{i}"] for i in range(len(n))]))
        assert torch.equal(batch.loss_mask, torch.cat([self.t[f"noisy/loss_mask_{i}"] for i in range(len(n))]))
        close(batch.txt, self.t["dit/txt"])
        close(batch.timestep, self.t["dit/timestep"])
        assert (
            [2 * k for k in n]
            == self.t["dit/txt_shape"].flatten().tolist()
            == self.t["dit/txt_q_shape"].flatten().tolist()
        )
        assert torch.equal(batch.positions, self.t["dit/k_position_ids"])
        assert torch.equal(batch.positions, self.t["dit/q_position_ids"])
        assert torch.equal(batch.mask() == 0, self.t["dit/attn_mask_override"] == 0)
        with torch.no_grad():
            out = batch.run(dit)
        close(out, self.t["dit/out"])
        close(batch.term(out).mean(), self.t["out/loss"])


@pytest.mark.parametrize("name", PRETRAIN_CASES)
def test_pretrain_step_replays_reference(fx: Any, vae: ColaTextVAE, dit: ColaDiT, name: str) -> None:
    case = Case(fx, name)
    cfg = case.config(vae, dit, prompt_block_prob=case.settings["prompt_block_prob"])
    ids = case.t["in/inputs"]
    draws = case.replay(cfg, ids.shape[0])
    assert [cfg.block_sizes[i] for i in draws.block_index] == case.meta["in/sample_block_sizes"]
    lens = [case.t[f"in/z0_{i}"].shape[0] for i in range(ids.shape[0])]
    case.check_layout_and_loss(cfg, dit, draws, [torch.zeros(n, dtype=torch.bool) for n in lens])
    for i, bs in enumerate(cfg.block_sizes[k] for k in draws.block_index):
        row = F.pad(ids[i], (0, -ids.shape[1] % bs), value=cfg.pad_id)  # the scripts pad with their stop token
        with torch.no_grad():
            enc = vae.encode([row])
        assert enc.params is not None
        post = posterior(enc.params[0])
        eps = draws.vae.posterior_eps
        z = post.mean if eps is None else post.mean + post.std * eps[i]
        close((z - vae.config.shifting_factor) * vae.config.scaling_factor, case.t[f"in/z0_{i}"])
    # the whole TokenBatch path: padding, VAE encode, posterior sample, scaling, noisy copies, DiT, loss
    batch = TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool))
    with torch.no_grad():
        out = ColaObjective(cfg, vae, dit, None, ColaSchedule(cfg)).loss(batch, draws)
    close(out.loss, case.t["out/loss"])
    assert out.metrics["fm"] == pytest.approx(float(out.loss))


@pytest.mark.parametrize("name", SFT_CASES)
def test_sft_step_replays_reference(fx: Any, vae: ColaTextVAE, dit: ColaDiT, name: str) -> None:
    case = Case(fx, name)
    cfg = case.config(vae, dit, loss_mode=case.settings["loss_mode"], boundary_mode=case.settings["boundary_mode"])
    roles = case.meta["in/roles"]
    draws = case.replay(cfg, len(roles))
    cond = [torch.tensor([r == "P" for r in row]) for row in roles]
    for i, ids in enumerate(case.t[f"in/input_ids_{i}"] for i in range(len(roles))):  # mode, (z − 0.05)·1.3
        with torch.no_grad():
            z = vae.encode([ids]).latents[0]
        close((z - vae.config.shifting_factor) * vae.config.scaling_factor, case.t[f"in/z0_{i}"])
    case.check_layout_and_loss(cfg, dit, draws, cond)


def test_sft_states_follow_the_boundary_rules() -> None:
    #                    block 0     block 1     block 2
    cond = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    token = role_states(cond, 4, "sft", "token")
    assert token.tolist() == [0, 1, 2, 1, 1, 2, 2, 1, 0, 0, 0, 0]
    block = role_states(cond, 4, "sft", "block")
    assert block.tolist() == [0, 1, 0, 1, 1, 2, 2, 1, 0, 0, 0, 0]
    assert role_states(cond, 4, "all_token", "block").tolist() == [1, 1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1]
    assert (role_states(torch.zeros(8, dtype=torch.bool), 2, "sft", "token") == NOISY).all()
