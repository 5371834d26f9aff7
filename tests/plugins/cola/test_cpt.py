"""``padding_loss``: continued pretraining trains padding latents, as ``cola_cpt.py`` does (spec §9.2).

``cola_pretrain.py`` masks the loss after a row's unpadded length; ``cola_cpt.py`` keeps its loss mask of ones,
so the stop-token padding of a row to a block multiple is noised and trained. The reference's step is rebuilt
here from the spec's formulas on a tiny case (rows padded to a block multiple, one with a data fill, prompt
blocks on) and compared with the objective's loss under both settings.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import cdlm
from cdlm.interfaces import TokenBatch
from cdlm_cola import layout
from cdlm_cola.objective import ColaDraws, ColaObjective

BLOCK, ROWS, LENGTH = 4, 3, 14  # 14 tokens: every row gets 2 padding latents to reach 16
FILL = 5  # the last row's last 5 tokens are the data's fill (batch.mask False)


def objective(padding_loss: str, stage: str = "dit", prompt_block_prob: float = 0.5) -> ColaObjective:
    """The tiny recipe's objective, built by the plugin, on the posterior mode (no posterior noise in ``dit``)."""
    fields = {"stage": stage, "vae_mode": "mode", "block_sizes": [BLOCK], "prompt_block_prob": prompt_block_prob}
    overrides = [f"model.{k}={v}" for k, v in {**fields, "padding_loss": padding_loss}.items()]
    obj = cdlm.build(cdlm.load_recipe("cola-tiny", overrides)).objective
    assert isinstance(obj, ColaObjective)
    return obj


def token_rows(pad_id: int) -> TokenBatch:
    ids = torch.randint(3, 100, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(ROWS, LENGTH, dtype=torch.bool)
    mask[-1, LENGTH - FILL :] = False
    return TokenBatch(ids.masked_fill(~mask, pad_id), mask, torch.zeros_like(mask))


def scripts_loss(obj: ColaObjective, batch: TokenBatch, draws: ColaDraws, *, mask_padding: bool) -> Tensor:
    """The scripts' flow-matching step on the objective's draws (spec §5, §9.2), written from the formulas.

    ``mask_padding``: ``cola_pretrain.py``'s zeroing of the loss mask after the unpadded length; without it,
    ``cola_cpt.py``'s all-ones mask (the stop-token padding is trained).
    """
    vae, cfg = obj.vae.config, obj.cfg
    assert draws.prompt_use is not None and draws.prompt_split is not None
    txt, times, positions, targets, loss_masks, lens = [], [], [], [], [], []
    for i in range(ROWS):
        row = F.pad(batch.ids[i], (0, -LENGTH % BLOCK), value=cfg.pad_id)  # to a block multiple
        with torch.no_grad():
            z0 = (obj.vae.encode([row]).latents[0] - vae.shifting_factor) * vae.scaling_factor  # (L, d)
        L, t = z0.shape[0], float(draws.t[i])
        z1 = draws.eps[i * L : (i + 1) * L]  # every row has L latents
        noisy, ts = (1 - t) * z0 + t * z1, torch.full((L,), t * cfg.time_scale)
        loss_mask = torch.ones(L)
        if mask_padding:
            loss_mask[int(batch.mask[i].sum()) :] = 0.0  # the unpadded length: real tokens come first
        for b in range(L // BLOCK):
            if float(draws.prompt_use[i][b]) < cfg.prompt_block_prob:
                s = slice(b * BLOCK, b * BLOCK + int(draws.prompt_split[i][b]))
                noisy[s], ts[s], loss_mask[s] = z0[s], 0.0, 0.0
        txt.append(torch.cat([z0, noisy]))
        times.append(torch.cat([torch.zeros(L), ts]))
        positions.append(torch.cat([torch.arange(L), torch.arange(L)]))
        targets.append(z1 - z0)
        loss_masks.append(loss_mask)
        lens.append(L)
    mask = layout.twol_block_causal_mask(lens, [BLOCK] * ROWS, torch.float32)
    pos, k_lens = torch.cat(positions), [2 * n for n in lens]
    with torch.no_grad():
        out = obj.dit(torch.cat(txt), k_lens, k_lens, torch.cat(times), k_positions=pos, q_positions=pos, mask=mask)
    pred = torch.cat([part[n:] for part, n in zip(out.split(k_lens), lens, strict=True)])  # the noisy halves
    error = (pred - torch.cat(targets)).pow(2).mean(dim=-1)
    m = torch.cat(loss_masks)
    return (error * m).sum() / m.sum().clamp(min=1.0)


@pytest.mark.parametrize("padding_loss", ["masked", "trained"])
def test_loss_is_the_scripts_with_and_without_padding(padding_loss: str) -> None:
    obj = objective(padding_loss)
    batch = token_rows(obj.cfg.pad_id)
    draws = obj.draw(batch, torch.Generator().manual_seed(3))
    assert draws.prompt_use is not None
    assert (draws.prompt_use[0] < 0.5).any()  # some prompt blocks: their clean prefix stays untrained
    with torch.no_grad():
        loss = obj.loss(batch, draws).loss
    cpt = scripts_loss(obj, batch, draws, mask_padding=False)
    pretrain = scripts_loss(obj, batch, draws, mask_padding=True)
    assert abs(float(cpt - pretrain)) > 1e-3  # the padding latents weigh in the tiny case
    expected = cpt if padding_loss == "trained" else pretrain
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


def test_trained_padding_gets_a_loss_and_masked_padding_none() -> None:
    for padding_loss, moves in (("masked", False), ("trained", True)):
        obj = objective(padding_loss, prompt_block_prob=0.0)
        batch = token_rows(obj.cfg.pad_id)
        draws = obj.draw(batch, torch.Generator().manual_seed(4))
        z1 = draws.eps.clone()
        z1[-4:] += 10.0  # the last row's last block is all padding (2 fill latents + 2 block pads)
        with torch.no_grad():
            base = obj.loss(batch, draws).loss.item()
            moved = obj.loss(batch, replace(draws, eps=z1)).loss.item()
        assert (moved != pytest.approx(base, abs=1e-6)) == moves, padding_loss


def test_padding_loss_leaves_the_vae_terms_alone() -> None:
    generator = torch.Generator().manual_seed(6)
    masked, trained = objective("masked", "joint"), objective("trained", "joint")
    batch = token_rows(masked.cfg.pad_id)
    draws = masked.draw(batch, generator)
    with torch.no_grad():
        a, b = masked.loss(batch, draws).metrics, trained.loss(batch, draws).metrics
    assert {k: v for k, v in a.items() if k != "fm"} == {k: v for k, v in b.items() if k != "fm"}
    assert a["fm"] != pytest.approx(b["fm"], abs=1e-6)
