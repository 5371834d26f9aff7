"""Cola training objective (spec §9): the VAE terms, the 2L flow-matching gradients, stages, draws and learning."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from cdlm.errors import RecipeError
from cdlm.interfaces import Objective, TokenBatch
from cdlm_cola.components import ReferenceVAE
from cdlm_cola.config import ColaConfig, ColaDitConfig, ColaVaeConfig
from cdlm_cola.dit import ColaDiT
from cdlm_cola.objective import ColaObjective, objective_for
from cdlm_cola.objective_flow import CLEAN, HIDDEN, NOISY, two_layout, with_prompt_blocks
from cdlm_cola.objective_vae import kl_between, kl_to_standard_normal, mask_tokens, neg_entropy
from cdlm_cola.schedule import ColaSchedule
from cdlm_cola.vae import ColaTextVAE, Posterior, posterior

VOCAB, LATENT = 64, 4
VAE = ColaVaeConfig(
    vocab_size=VOCAB, dim=32, ffn_dim=64, encoder_num_blocks=1, decoder_num_blocks=1, num_heads=2,
    latent_dim=LATENT, block_size=4, scaling_factor=1.3, shifting_factor=0.05,
)  # fmt: skip
DIT = ColaDitConfig(
    txt_in_channels=LATENT, txt_out_channels=LATENT, txt_dim=32, emb_dim=32, heads=2, head_dim=16, num_layers=1,
    rope_dim=8, block_size=4,
)  # fmt: skip


def make(stage: str, **fields: object) -> tuple[Objective, ColaTextVAE, ColaDiT, ReferenceVAE]:
    g = torch.Generator().manual_seed(0)
    vae, dit = ColaTextVAE(VAE, g), ColaDiT(DIT, g)
    ref = ReferenceVAE(vae)
    ref.anchor(vae)  # joint training starts here: what later changes the VAE is training
    ref.requires_grad_(False)
    defaults: dict[str, object] = {"block_sizes": [1, 2, 4], "prompt_block_prob": 0.5, "pad_id": 0}
    cfg = ColaConfig(vae=VAE, dit=DIT, stage=stage, **{**defaults, **fields})
    return objective_for(cfg, vae, dit, ref, ColaSchedule(cfg)), vae, dit, ref


def batch(rows: int = 3, length: int = 16) -> TokenBatch:
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[-1, length - 5 :] = False  # a padded tail
    return TokenBatch(ids.masked_fill(~mask, 0), mask, torch.zeros_like(mask))


def moments(seed: int, n: int = 5) -> Posterior:
    g = torch.Generator().manual_seed(seed)
    return posterior(torch.randn(n, 2 * LATENT, generator=g))


def test_regularisers_match_torch_distributions() -> None:
    q, r = moments(0), moments(1)
    nq, nr = Normal(q.mean, q.std), Normal(r.mean, r.std)
    torch.testing.assert_close(kl_to_standard_normal(q), kl_divergence(nq, Normal(0.0, 1.0)).sum(-1))
    torch.testing.assert_close(kl_between(q, r), kl_divergence(nq, nr).sum(-1))
    torch.testing.assert_close(neg_entropy(q), -nq.entropy().sum(-1))
    assert kl_between(q, q).abs().max() < 1e-6


def test_masking_replaces_only_real_tokens() -> None:
    ids, valid = torch.arange(3, 11), torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    u = torch.tensor([0.1, 0.9, 0.0, 0.5, 0.14, 0.2, 0.0, 0.01])
    out, masked = mask_tokens(ids, valid, u, 0.15, mask_id=VOCAB)
    assert masked.tolist() == [True, False, True, False, True, False, False, False]
    assert out.tolist() == [VOCAB, 4, VOCAB, 6, VOCAB, 8, 9, 10]


def test_mask_loss_is_the_ce_of_the_masked_positions_only() -> None:
    obj, vae, _, _ = make("vae")
    b = batch()
    draws = obj.draw(b, torch.Generator().manual_seed(2))
    assert draws.mask_u is not None and draws.mask_eps is not None
    u = [torch.ones_like(x) for x in draws.mask_u]
    u[1][5] = 0.0  # exactly one masked token: row 1, position 5
    out = obj.loss(b, replace(draws, mask_u=u))
    corrupted = b.ids[1].clone()
    corrupted[5] = VOCAB  # the [MASK] id: the extra embedding row
    params = vae.encode([corrupted]).params
    assert params is not None
    post = posterior(params[0])
    logits = vae.decode(post.mean + post.std * draws.mask_eps[1], [16], [16])  # (16, V)
    expected = F.cross_entropy(logits[5:6], b.ids[1, 5:6])
    assert out.metrics["mask_ce"] == pytest.approx(float(expected.detach()), abs=1e-5)


def test_stage1_loss_combines_its_terms() -> None:
    obj, *_ = make("vae", kl_weight=0.3, mask_weight=0.7, recon_weight=2.0)
    out = obj(batch(), torch.Generator().manual_seed(3))
    m = out.metrics
    assert set(m) == {"recon_ce", "recon_acc", "kl", "mask_ce"}
    expected = 2.0 * (m["recon_ce"] + 0.3 * m["kl"] + 0.7 * m["mask_ce"])
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_joint_loss_combines_its_terms() -> None:
    obj, vae, _, ref = make("joint", kl_weight=0.3, fm_weight=0.5, ref_kl_weight=2.0)
    with torch.no_grad():
        for p in vae.encoder.final_layer.parameters():
            p.add_(0.05)  # the live encoder has moved away from the reference
    out = obj(batch(), torch.Generator().manual_seed(3))
    m = out.metrics
    assert set(m) == {"recon_ce", "recon_acc", "neg_entropy", "mask_ce", "fm", "ref_kl"}
    assert m["ref_kl"] > 0
    expected = m["recon_ce"] + 0.3 * m["neg_entropy"] + m["mask_ce"] + 0.5 * m["fm"] + 2.0 * m["ref_kl"]
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_history_half_is_stop_gradient() -> None:
    g = torch.Generator().manual_seed(4)
    dit = ColaDiT(DIT, g)
    z0 = [torch.randn(8, LATENT, generator=g).requires_grad_() for _ in range(2)]
    z1 = torch.randn(16, LATENT, generator=g)
    states = torch.tensor([NOISY] * 8 + [CLEAN, NOISY, NOISY, NOISY, NOISY, HIDDEN, NOISY, NOISY])
    valid = torch.ones(16, dtype=torch.bool)
    schedule = ColaSchedule(ColaConfig())
    lay = two_layout(torch.cat(z0), z1, torch.tensor([0.3, 0.7]), states, valid, [8, 8], [4, 2], schedule)
    clean = torch.cat([torch.arange(16) < 8] * 2)
    for z in z0:  # the clean half carries no gradient back to z_0; the noisy half does
        assert torch.autograd.grad(lay.txt[clean].sum(), z, retain_graph=True)[0].abs().max() == 0
        assert torch.autograd.grad(lay.txt[~clean].sum(), z, retain_graph=True)[0].abs().max() > 0
    loss = lay.term(lay.run(dit, samples_per_call=1)).mean()
    grads = torch.autograd.grad(loss, [*z0, *dit.parameters()], allow_unused=True)
    assert all(gr is not None and gr.abs().max() > 0 for gr in grads[:2])
    assert sum(gr.abs().sum() for gr in grads[2:] if gr is not None) > 0


def test_layout_calls_in_groups_equal_one_call() -> None:
    obj, _, dit, _ = make("dit", block_sizes=[2, 4])
    assert isinstance(obj, ColaObjective)
    draws = obj.draw(batch(length=14), torch.Generator().manual_seed(5))
    sizes = [obj.block_sizes[i] for i in draws.block_index]
    lens = [14 + (-14 % bs) for bs in sizes]
    assert len(set(lens)) > 1  # samples of different lengths: NA calls, grouped or all at once
    z0 = torch.randn(draws.eps.shape, generator=torch.Generator().manual_seed(6))
    states, valid = torch.full((sum(lens),), NOISY), torch.ones(sum(lens), dtype=torch.bool)
    lay = two_layout(z0, draws.eps, draws.t, states, valid, lens, sizes, obj.schedule)
    with torch.no_grad():
        torch.testing.assert_close(lay.run(dit, 1), lay.run(dit), atol=1e-5, rtol=0)


def test_prompt_blocks_clean_a_prefix_of_chosen_blocks() -> None:
    states = torch.full((12,), NOISY)
    out = with_prompt_blocks(states, 4, torch.tensor([0.1, 0.9, 0.2]), torch.tensor([3, 1, 1]), 0.5)
    assert out.tolist() == [CLEAN] * 3 + [NOISY] * 5 + [CLEAN] + [NOISY] * 3
    assert torch.equal(with_prompt_blocks(states, 1, torch.zeros(12), torch.ones(12, dtype=torch.long), 1.0), states)


@pytest.mark.parametrize(
    ("stage", "trained"), [("vae", {"vae"}), ("joint", {"vae", "dit"}), ("dit", {"dit"})]
)  # fmt: skip
def test_only_the_stage_networks_get_gradients(stage: str, trained: set[str]) -> None:
    obj, vae, dit, ref = make(stage, vae_mode="sample")
    ref.requires_grad_(True)  # even if it could, the reference encoder must receive nothing
    with torch.no_grad():
        for p in vae.encoder.final_layer.parameters():
            p.add_(0.05)
    obj(batch(), torch.Generator().manual_seed(7)).loss.backward()
    for name, net in (("vae", vae), ("dit", dit), ("ref_vae", ref)):
        total = sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None)
        assert (total > 0) == (name in trained), f"{stage}: {name} gradient sum {total}"


def test_flow_matching_trains_the_encoder_in_stage2() -> None:
    obj, vae, _, _ = make("joint", recon_weight=0.0, ref_kl_weight=0.0)
    obj(batch(), torch.Generator().manual_seed(8)).loss.backward()
    assert vae.encoder.final_layer.weight.grad is not None and vae.encoder.final_layer.weight.grad.abs().max() > 0
    decoder = vae.decoder.final_layer.weight.grad  # the decoder is not on the flow-matching path
    assert decoder is None or decoder.abs().max() == 0


@pytest.mark.parametrize("stage", ["vae", "joint", "dit"])
def test_draws_replay_equals_a_call(stage: str) -> None:
    obj, *_ = make(stage)
    b = batch()
    direct = obj(b, torch.Generator().manual_seed(9))
    replayed = obj.loss(b, obj.draw(b, torch.Generator().manual_seed(9)))
    assert direct.loss.item() == replayed.loss.item()
    assert direct.metrics == replayed.metrics


@pytest.mark.parametrize("stage", ["vae", "joint", "dit"])
def test_loss_decreases_on_a_fixed_batch(stage: str) -> None:
    obj, vae, dit, _ = make(stage)
    params = [*(vae.parameters() if stage != "dit" else ()), *(dit.parameters() if stage != "vae" else ())]
    opt = torch.optim.Adam(params, lr=1e-2)
    b = batch()
    draws = obj.draw(b, torch.Generator().manual_seed(10))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = obj.loss(b, draws).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_padding_is_never_trained() -> None:
    obj, *_ = make("dit", block_sizes=[4], prompt_block_prob=0.0)
    b = batch(rows=1, length=14)  # padded to 16 latents; the last 5 tokens are not real either
    draws = obj.draw(b, torch.Generator().manual_seed(11))
    assert draws.eps.shape == (16, LATENT)
    base = obj.loss(b, draws).loss.item()
    z1 = draws.eps.clone()
    z1[12:] += 10.0  # the last block is all padding: no trained latent attends to its noisy rows
    assert obj.loss(b, replace(draws, eps=z1)).loss.item() == pytest.approx(base)


def test_bad_setups_are_rejected() -> None:
    g = torch.Generator().manual_seed(0)
    vae, dit = ColaTextVAE(VAE, g), ColaDiT(DIT, g)
    cfg = ColaConfig(vae=VAE, dit=DIT, stage="joint", pad_id=0)
    with pytest.raises(RecipeError, match="ref_vae"):
        ColaObjective(cfg, vae, dit, None, ColaSchedule(cfg))
    plain = VAE.model_copy(update={"use_variation": False})
    cfg = ColaConfig(vae=plain, dit=DIT, stage="vae", pad_id=0)
    with pytest.raises(RecipeError, match="use_variation"):
        objective_for(cfg, ColaTextVAE(plain, g), dit, None, ColaSchedule(cfg))
    cfg = ColaConfig(vae=plain, dit=DIT, stage="dit", vae_mode="mode", pad_id=0)  # the mode needs no posterior
    obj = ColaObjective(cfg, ColaTextVAE(plain, g), dit, None, ColaSchedule(cfg))
    assert obj(batch(), torch.Generator().manual_seed(0)).loss.item() > 0
    with pytest.raises(ValueError, match="block_size_probs"):
        ColaConfig(vae=VAE, dit=DIT, block_sizes=[1, 2], block_size_probs=[1.0])
