"""ELF's training objective (ELF spec §3.2–3.3): the core flow matching, extended by decoder rows and SC-CFG.

:class:`ElfObjective` is a :class:`~cdlm.objective.FlowMatchingObjective`: times from the schedule
(``ElfSchedule.sample_t``), the noise, the path, the v-space loss against ``schedule.velocity`` and the single
denominator (the number of loss tokens over all rows) are the core's. ELF adds what differs: label dropout
(in the draws and the encoder mask), and per row, either a denoiser row (the flow-matching loss with the
self-conditioning guidance target) or, with probability ``decoder_prob``, a decoder row (cross-entropy of the
decoder head on a λ-mix of the clean latents and noise at t = 1, mode tokens on).

The random draws (:meth:`ElfObjective.draw`) are split from the maths (:meth:`ElfObjective.loss`) so that a
recorded step can be replayed exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cdlm.interfaces import TokenBatch
from cdlm.objective import FlowDraws, FlowMatchingObjective, LossTerm, token_cross_entropy
from cdlm_elf.conditioning import ElfCond
from cdlm_elf.config import ElfConfig
from cdlm_elf.embedder import T5Embedder, encoder_mask
from cdlm_elf.model import ElfDenoiser, ElfTransformer
from cdlm_elf.schedule import ElfSchedule


@dataclass(frozen=True)
class ElfDraws(FlowDraws):
    """The random draws of one training step (spec §3.2), before any scaling except the times.

    Draw order: ``label_drop``, then the core's ``t`` and ``eps``, then ``dec``, ``lam``, ``eps_dec``, ``use_sc``,
    ``sc_scale``.

    Attributes:
        t: (B,) training times from ``ElfSchedule.sample_t``: ``sigmoid(p_std·N(0, 1) + p_mean)`` or U[0, 1).
        eps: (B, L, C) N(0, 1) denoiser noise (scaled by ``noise_scale`` on the path).
        label_drop: (B,) U[0, 1) label-dropout draw (drawn first), or None when there is no label dropout.
        dec: (B,) Bernoulli(``decoder_prob``) as float, 1 = decoder (CE) row.
        lam: (B·L,) N(0, 1) logits of the per-token decoder mixing coefficient λ.
        eps_dec: (B, L, C) N(0, 1) decoder noise (before ×``decoder_noise_scale``).
        use_sc: (B,) U[0, 1); a row is self-conditioned where it is < ``self_cond_prob``.
        sc_scale: (B,) U[0, 1); mapped to the SC-CFG scale w with log-uniform 1 + w.
    """

    label_drop: Tensor | None
    dec: Tensor
    lam: Tensor
    eps_dec: Tensor
    use_sc: Tensor
    sc_scale: Tensor


def _logit_normal(logits: Tensor, mean: float, std: float) -> Tensor:
    """Map N(0, 1) draws to ``sigmoid(std·r + mean)``."""
    return torch.sigmoid(logits * std + mean)


def decoder_input(x0: Tensor, lam: Tensor, eps_dec: Tensor, cfg: ElfConfig) -> Tensor:
    """Return the decoder rows' input ``λ·x0 + (1 − λ)·ε_d·scale`` (B, L, C), λ per token (spec §3.3 step 5).

    Args:
        x0: (B, L, C) clean latents.
        lam: (B·L,) N(0, 1) logits of λ.
        eps_dec: (B, L, C) N(0, 1) decoder noise, before ×``decoder_noise_scale``.
        cfg: the ELF config (``decoder_p_mean``, ``decoder_p_std``, ``decoder_noise_scale``).
    """
    B, L, _ = x0.shape
    lam = _logit_normal(lam, cfg.decoder_p_mean, cfg.decoder_p_std).view(B, L, 1)  # (B, L, 1)
    return lam * x0 + (1 - lam) * (eps_dec * cfg.decoder_noise_scale)


def sc_scale(r: Tensor, cfg: ElfConfig) -> Tensor:
    """Map U[0, 1) draws r (B,) to SC-CFG scales w with 1 + w log-uniform on [1 + min, 1 + max] (spec §3.2 step 7)."""
    low, high = 1 + cfg.self_cond_cfg_min, 1 + cfg.self_cond_cfg_max
    return low * torch.exp(r * math.log(high / low)) - 1  # (B,)


def loss_mask(batch: TokenBatch, pad_token: Literal["pad", "eos"]) -> Tensor:
    """Return the (B, L) float loss mask: target positions, padding included when it is EOS (``data.pad_token``)."""
    valid = batch.mask if pad_token == "pad" else torch.ones_like(batch.mask)
    return (valid & ~batch.cond_mask).float()


class ElfObjective(FlowMatchingObjective):
    """The ELF training loss over a batch (spec §3.3): 2 no-grad forwards plus 1 forward with grad.

    Args:
        cfg: the ELF model config (objective hyper-parameters: ``decoder_*``, ``self_cond_*``,
            ``label_drop_prob``).
        embedder: the frozen T5 embedder producing the clean latents x0.
        network: the ELF network, called in denoise and (per-row gated) decode mode.
        schedule: ELF's schedule: training times, the path ``z_t = t·x + (1 − t)·s·ε``, ``v = (x − z)/max(1 − t,
            t_eps)``.
        pad_token: ``"pad"`` masks padding (``batch.mask`` False) out of the loss; ``"eos"`` trains the EOS
            padding as the reference does for seq2seq (``data.pad_token``). The encoder mask always uses
            ``batch.mask``.
    """

    embedder: T5Embedder

    def __init__(
        self,
        cfg: ElfConfig,
        embedder: T5Embedder,
        network: ElfTransformer,
        schedule: ElfSchedule,
        *,
        pad_token: Literal["pad", "eos"] = "pad",
    ) -> None:
        super().__init__(embedder, ElfDenoiser(network), schedule, (cfg.max_length, cfg.latent_dim))
        self.cfg, self.network, self.pad_token = cfg, network, pad_token

    def draw(self, batch: TokenBatch, generator: torch.Generator) -> ElfDraws:
        """Draw every random number of one step from ``generator``, in the spec §3.2 order.

        Args:
            batch: the micro-batch; ``ids`` (B, L) fixes the shapes, ``cond_mask`` decides on label dropout.
            generator: the only source of randomness; draws happen on its device, then move to the batch's.

        Returns:
            The raw draws (see :class:`ElfDraws`).
        """
        B, L = batch.ids.shape
        C, device = self.cfg.latent_dim, batch.ids.device

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, device=generator.device).to(device)

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=generator, device=generator.device).to(device)

        has_label_drop = self.cfg.label_drop_prob > 0 and bool(batch.cond_mask.any())
        label_drop = rand(B) if has_label_drop else None
        flow = super().draw(batch, generator)  # t from ElfSchedule.sample_t, then ε (B, L, C)
        probs = torch.full((B,), self.cfg.decoder_prob, device=generator.device)
        dec = torch.bernoulli(probs, generator=generator).to(device)
        return ElfDraws(
            t=flow.t,
            eps=flow.eps,
            label_drop=label_drop,
            dec=dec,
            lam=randn(B * L),
            eps_dec=randn(B, L, C),
            use_sc=rand(B),
            sc_scale=rand(B),
        )

    def embed(self, batch: TokenBatch, draws: ElfDraws) -> Tensor:
        """Return x0 (B, L, C): the batch encoded under the spec §2 mask, dropped rows without their condition."""
        return self.embedder.encode(batch.ids, encoder_mask(batch.mask, batch.cond_mask, self._dropped(draws)))

    def loss_mask(self, batch: TokenBatch) -> Tensor:
        """Return the (B, L) float loss mask of :func:`loss_mask` for this objective's ``pad_token`` (step 2)."""
        return loss_mask(batch, self.pad_token)

    def terms(self, batch: TokenBatch, x0: Tensor, draws: ElfDraws, mask: Tensor) -> dict[str, LossTerm]:
        """Return the spec §3.3 terms: ``ce_loss`` on the decoder rows, ``l2_loss`` (v-space) on the others.

        Args:
            batch: ``ids`` (B, L) int64, ``mask`` (B, L) bool validity, ``cond_mask`` (B, L) bool condition.
            x0: (B, L, C) clean latents (:meth:`embed`).
            draws: the raw random draws of this step.
            mask: (B, L) the loss mask; each term takes its rows of it.
        """
        cfg, schedule = self.cfg, self.schedule
        B, L = batch.ids.shape
        cond_mask = batch.cond_mask  # (B, L) bool
        drop = self._dropped(draws)  # (B,) bool or None
        t = draws.t  # (B,)
        z = torch.where(cond_mask[..., None], x0, schedule.interpolate(x0, draws.eps, t))  # (B, L, C), step 3
        if drop is not None:  # step 4: dropped rows lose their condition latents in z and x0
            keep = ~(drop[:, None] & cond_mask)[..., None]  # (B, L, 1)
            z, x0 = z * keep, x0 * keep
        z_dec = decoder_input(x0, draws.lam, draws.eps_dec, cfg)  # (B, L, C), step 5, no restore
        v_target = schedule.velocity(x0, draws.eps, z, t)  # (B, L, C), step 6

        dec = draws.dec  # (B,) 1 = decoder row
        use_sc = (draws.use_sc < cfg.self_cond_prob).float()[:, None, None]  # (B, 1, 1)
        w = sc_scale(draws.sc_scale, cfg)  # (B,)
        cond = ElfCond(sc_scale=w, values=x0, mask=cond_mask)
        row = dec[:, None, None]  # (B, 1, 1)

        sc_guidance = cfg.self_cond_prob > 0  # otherwise use_sc is all 0 and x_init is never read
        sc_half = cond.restore(torch.zeros_like(z))  # (B, L, C) restore(0)
        if sc_guidance:
            with torch.no_grad():  # step 7: shared unconditional pass at the denoiser (z, t)
                out_u = self._denoise(z, sc_half, t, w)
            x_init = cond.restore(out_u)  # (B, L, C)
            sc_half = cond.restore(x_init * use_sc)  # step 8
        sc_half = sc_half * (1 - row)  # decoder rows get an all-zero second half

        t_mix = dec + (1 - dec) * t  # (B,) decoder rows at t = 1, step 9
        z_mix = row * z_dec + (1 - row) * z  # (B, L, C)
        rows = dec.nonzero().squeeze(1)  # (K,) decoder rows: the only ones whose logits reach the loss
        out, logits = self.network(torch.cat([z_mix, sc_half], dim=-1), t_mix, w, decode_gate=dec, logit_rows=rows)
        assert logits is not None  # decode_gate is a tensor, so the decoder head ran

        target = v_target
        if sc_guidance:  # step 10: distil SC-CFG with scale w into the single forward
            with torch.no_grad():
                out_c = self._denoise(z, x_init, t, w)
            v_u, v_c = schedule.predict(out_u, z, t).v, schedule.predict(out_c, z, t).v
            target = v_target + use_sc * (1 - 1 / w)[:, None, None] * (v_c - v_u)

        # step 11: per-token losses in fp32; decoder rows' l2 also uses (z, t) but is masked out
        # CE only on decoder rows (K, L); the other rows' CE is 0 and masked out, as it was when computed in full
        ce_rows = token_cross_entropy(logits, batch.ids[rows])  # (K, L)
        ce = torch.zeros(B, L, device=ce_rows.device).index_copy(0, rows, ce_rows)  # (B, L)
        l2 = (schedule.predict(out, z, t).v - target).pow(2).mean(dim=-1)  # (B, L)
        return {
            "ce_loss": LossTerm(ce, mask * dec[:, None]),
            "l2_loss": LossTerm(l2, mask * (1 - dec[:, None])),
        }

    def _dropped(self, draws: ElfDraws) -> Tensor | None:
        """Return the (B,) bool rows whose condition is dropped (label dropout), or None without label dropout."""
        return None if draws.label_drop is None else draws.label_drop < self.cfg.label_drop_prob

    def _denoise(self, z: Tensor, self_cond: Tensor, t: Tensor, w: Tensor) -> Tensor:
        """Run the network as a pure denoiser on [z, self_cond] (B, L, 2C); return x̂ (B, L, C) fp32."""
        out, _ = self.network(torch.cat([z, self_cond], dim=-1), t, w)
        return out.float()
