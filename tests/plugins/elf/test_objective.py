from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cdlm.config import TrainConfig
from cdlm.interfaces import TokenBatch
from cdlm.training.ema import EMA
from cdlm.training.optim import build_lr_schedule, build_optimizer
from cdlm_elf.config import ElfConfig, EncoderConfig
from cdlm_elf.embedder import T5Embedder, encoder_mask
from cdlm_elf.model import ElfTransformer
from cdlm_elf.objective import ElfDraws, ElfObjective
from cdlm_elf.schedule import ElfSchedule
from cdlm_elf.state_dict import ElfStateDictAdapter
from conftest import shared_path
from elf_fixture import objective_config


class _Case:
    """One recorded reference training step, with our objective built on the fixture weights."""

    def __init__(self, name: str) -> None:
        fixtures = shared_path("fixtures", "elf")
        self.fixtures = fixtures
        self.meta = json.loads((fixtures / f"{name}.json").read_text())
        self.data = load_file(fixtures / f"{name}.safetensors")
        train = self.meta["train_config"]
        self.cfg = objective_config(train)
        self.adapter = ElfStateDictAdapter(self.cfg)
        self.model = nn.ModuleDict({"network": ElfTransformer(self.cfg)})  # keys `network.…`, as the Method
        self.model.load_state_dict(self.adapter.from_official(load_file(fixtures / "model.safetensors")))
        embedder = T5Embedder(self.cfg)
        schedule = ElfSchedule(self.cfg)
        self.objective = ElfObjective(self.cfg, embedder, self.model["network"], schedule, pad_token=train["pad_token"])
        d = self.data
        self.batch = TokenBatch(
            ids=d["batch/input_ids"], mask=d["batch/attention_mask"].bool(), cond_mask=d["batch/cond_seq_mask"].bool()
        )
        raw = [d[f"randoms/{entry.split(':')[0]}"] for entry in self.meta["random_draw_order"]]
        label_drop, t, eps, dec, lam, eps_dec, use_sc, w = raw if len(raw) == 8 else [None, *raw]
        if self.cfg.time_schedule == "logit_normal":  # the recorded N(0, 1) draw, mapped as ElfSchedule.sample_t does
            t = torch.sigmoid(t * self.cfg.p_std + self.cfg.p_mean)
        self.draws = ElfDraws(
            t=t, eps=eps, label_drop=label_drop, dec=dec, lam=lam, eps_dec=eps_dec, use_sc=use_sc, sc_scale=w
        )

    def official_grads(self) -> dict[str, torch.Tensor]:
        return self.adapter.to_official({n: p.grad for n, p in self.model.named_parameters()})


@pytest.fixture(scope="module", params=["train_uncond", "train_cond"])
def case(request: pytest.FixtureRequest) -> _Case:
    return _Case(request.param)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_encoder_mask_and_latents_match(case: _Case) -> None:
    d, batch = case.data, case.batch
    assert torch.equal(encoder_mask(batch.mask, batch.cond_mask).float(), d["batch/encoder_attention_mask"])
    drop = None if case.draws.label_drop is None else case.draws.label_drop < case.cfg.label_drop_prob
    if drop is not None:
        assert torch.equal(drop, d["label_drop_mask"].bool())
    x0 = case.objective.embedder.encode(batch.ids, encoder_mask(batch.mask, batch.cond_mask, drop))
    torch.testing.assert_close(x0, d["x0/000"], atol=1e-5, rtol=0)


def test_loss_gradients_and_step_match_reference(case: _Case) -> None:
    out = case.objective.loss(case.batch, case.draws)
    ref = case.meta["metrics"][0]
    assert _rel(out.loss.item(), ref["loss"]) < 1e-6
    assert _rel(out.metrics["l2_loss"], ref["l2_loss"]) < 1e-6
    assert _rel(out.metrics["ce_loss"], ref["ce_loss"]) < 1e-6

    train = TrainConfig(lr=2e-3, optimizer="muon", lr_schedule="constant", warmup_steps=0, ema_decay=0.9999)
    params = list(case.model.parameters())
    ema = EMA(case.model, train.ema_decay)
    opt = build_optimizer(case.model.named_parameters(), train)
    sched = build_lr_schedule(opt, train)
    out.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, train.clip_grad_norm)
    assert _rel(norm.item(), case.meta["grad_norm_preclip"][0]) < 1e-5
    grads = case.official_grads()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, case.data[f"grads_last_postclip/{name}"], atol=1e-5, rtol=0, msg=name)

    assert [g["lr"] for g in opt.param_groups] == case.meta["lr_used_last"]
    opt.step()
    sched.step()
    ema.update(case.model)
    if "checkpoint" not in case.meta:
        return  # the conditional case stores losses and gradients only
    ckpt = torch.load(case.fixtures / "ckpt" / "checkpoint_1", map_location="cpu", weights_only=True)
    after = case.adapter.to_official(dict(case.model.named_parameters()))
    shadow = case.adapter.to_official(ema.state_dict())
    start = load_file(case.fixtures / "model.safetensors")
    for name in ckpt["params"]:
        torch.testing.assert_close(after[name].detach(), ckpt["params"][name], atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(shadow[name], ckpt["ema_params1"][name], atol=1e-5, rtol=0, msg=name)
    # the EMA moves only 1e-4 of the step (≤ 3e-7), below the tolerance above: compare the total movement too
    moved = sum((shadow[n] - start[n]).abs().sum() for n in start)
    ref_moved = sum((ckpt["ema_params1"][n] - start[n]).abs().sum() for n in start)
    assert _rel(moved.item(), ref_moved.item()) < 1e-2


def _tiny_objective(label_drop_prob: float) -> tuple[ElfObjective, TokenBatch]:
    enc = EncoderConfig(pretrained=None, vocab_size=40, d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    cfg = ElfConfig(
        max_length=8, latent_dim=16, hidden_size=16, depth=1, num_heads=2, bottleneck_dim=8, vocab_size=32,
        encoder=enc, label_drop_prob=label_drop_prob, decoder_prob=0.5,
    )  # fmt: skip
    network = ElfTransformer(cfg, generator=torch.Generator().manual_seed(0))
    objective = ElfObjective(cfg, T5Embedder(cfg), network, ElfSchedule(cfg))
    ids = torch.randint(2, 32, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(8)[None, :] < torch.tensor([[8], [6], [8]])
    cond_mask = torch.arange(8)[None, :] < torch.tensor([[3], [2], [4]])
    return objective, TokenBatch(ids, mask, cond_mask)


def test_draw_order_and_call_equals_replay() -> None:
    objective, batch = _tiny_objective(label_drop_prob=0.3)
    draws = objective.draw(batch, torch.Generator().manual_seed(5))
    assert draws.label_drop is not None and draws.label_drop.shape == (3,)
    assert draws.eps.shape == draws.eps_dec.shape == (3, 8, 16) and draws.lam.shape == (24,)
    # the same generator state replayed: identical draws in the spec order (t logit-normal), then identical loss
    gen = torch.Generator().manual_seed(5)
    label_drop, t = torch.rand(3, generator=gen), torch.sigmoid(torch.randn(3, generator=gen) * 0.8 - 1.5)
    expected = [label_drop, t, torch.randn(3, 8, 16, generator=gen)]
    expected.append(torch.bernoulli(torch.full((3,), 0.5), generator=gen))
    for got, want in zip((draws.label_drop, draws.t, draws.eps, draws.dec), expected, strict=True):
        assert torch.equal(got, want)
    called = objective(batch, torch.Generator().manual_seed(5))
    replayed = objective.loss(batch, draws)
    assert torch.equal(called.loss, replayed.loss) and called.metrics == replayed.metrics
    # no condition positions: no label-drop draw, so t comes first
    uncond = replace(batch, cond_mask=torch.zeros_like(batch.cond_mask))
    assert objective.draw(uncond, torch.Generator().manual_seed(5)).label_drop is None


def test_single_denominator_and_padding() -> None:
    objective, batch = _tiny_objective(label_drop_prob=0.0)
    draws = objective.draw(batch, torch.Generator().manual_seed(2))
    draws = replace(draws, dec=torch.tensor([1.0, 0.0, 0.0]))
    out = objective.loss(batch, draws)
    ce_tokens = (batch.mask & ~batch.cond_mask)[0].sum()
    l2_tokens = (batch.mask & ~batch.cond_mask)[1:].sum()
    combined = (out.metrics["ce_loss"] * ce_tokens + out.metrics["l2_loss"] * l2_tokens) / (ce_tokens + l2_tokens)
    assert out.loss.item() == pytest.approx(combined.item(), rel=1e-6)
    # 'eos' padding trains the padded positions of row 1: the loss changes, the denominator grows by 2
    objective.pad_token = "eos"
    assert objective.loss(batch, draws).loss.item() != pytest.approx(out.loss.item(), rel=1e-6)
