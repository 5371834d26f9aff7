"""ELF's training objective (ELF spec §3.2–3.3): per-example decoder/denoiser mixing with SC-CFG distillation.

Each row is either a denoiser row (flow-matching loss in v-space at a logit-normal time, with the
self-conditioning guidance target) or, with probability ``decoder_prob``, a decoder row (cross-entropy of the
decoder head on a λ-mix of the clean latents and noise at t = 1, mode tokens on). Both branches share one
denominator: the number of loss tokens over all rows.

The random draws (:meth:`ElfObjective.draw`) are split from the maths (:meth:`ElfObjective.loss`) so that a
recorded step can be replayed exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cdlm.flow import RectifiedFlow
from cdlm.interfaces import LossOutput, Objective, TokenBatch
from cdlm_elf.conditioning import ElfCond
from cdlm_elf.config import ElfConfig
from cdlm_elf.embedder import T5Embedder, encoder_mask
from cdlm_elf.model import ElfTransformer


@dataclass(frozen=True)
class ElfDraws:
    """The raw random draws of one training step, in call order (spec §3.2), before any scaling.

    Attributes:
        label_drop: (B,) U[0, 1) label-dropout draw (drawn first), or None when there is no label dropout.
        t: (B,) N(0, 1) time logits (``time_schedule: logit_normal``) or U[0, 1) times (``uniform``).
        eps: (B, L, C) N(0, 1) denoiser noise (scaled by ``noise_scale`` on the path).
        dec: (B,) Bernoulli(``decoder_prob``) as float, 1 = decoder (CE) row.
        lam: (B·L,) N(0, 1) logits of the per-token decoder mixing coefficient λ.
        eps_dec: (B, L, C) N(0, 1) decoder noise (before ×``decoder_noise_scale``).
        use_sc: (B,) U[0, 1); a row is self-conditioned where it is < ``self_cond_prob``.
        sc_scale: (B,) U[0, 1); mapped to the SC-CFG scale w with log-uniform 1 + w.
    """

    label_drop: Tensor | None
    t: Tensor
    eps: Tensor
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


def _combine(ce: Tensor, l2: Tensor, loss_mask: Tensor, dec: Tensor) -> LossOutput:
    """Mix the per-token losses (B, L) by row kind (dec (B,), 1 = CE row) over one denominator Σ loss_mask."""
    ce_mask, l2_mask = loss_mask * dec[:, None], loss_mask * (1 - dec[:, None])  # (B, L)
    ce_sum, l2_sum = (ce * ce_mask).sum(), (l2 * l2_mask).sum()
    loss = (ce_sum + l2_sum) / loss_mask.sum().clamp_min(1)
    metrics = {  # per-branch token means, as the reference logs them
        "ce_loss": float(ce_sum.detach() / ce_mask.sum().clamp_min(1)),
        "l2_loss": float(l2_sum.detach() / l2_mask.sum().clamp_min(1)),
    }
    return LossOutput(loss=loss, metrics=metrics)


class ElfObjective(Objective):
    """The ELF training loss over a batch (spec §3.3): 2 no-grad forwards plus 1 forward with grad.

    Args:
        cfg: the ELF model config (objective hyper-parameters: ``time_schedule``, ``p_mean``, ``decoder_*``,
            ``self_cond_*``, ``label_drop_prob``).
        embedder: the frozen T5 embedder producing the clean latents x0.
        network: the ELF network, called in denoise and (per-row gated) decode mode.
        flow: the path ``z_t = t·x + (1 − t)·s·ε`` and ``v = (x − z)/max(1 − t, t_eps)`` (``ElfSchedule.flow``).
        pad_token: ``"pad"`` masks padding (``batch.mask`` False) out of the loss; ``"eos"`` trains the EOS
            padding as the reference does for seq2seq (``data.pad_token``). The encoder mask always uses
            ``batch.mask``.
    """

    def __init__(
        self,
        cfg: ElfConfig,
        embedder: T5Embedder,
        network: ElfTransformer,
        flow: RectifiedFlow,
        *,
        pad_token: Literal["pad", "eos"] = "pad",
    ) -> None:
        self.cfg, self.embedder, self.network, self.flow = cfg, embedder, network, flow
        self.pad_token = pad_token

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Draw this step's random numbers from ``generator`` and compute the loss of ``batch``."""
        return self.loss(batch, self.draw(batch, generator))

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
        t = randn(B) if self.cfg.time_schedule == "logit_normal" else rand(B)
        eps = randn(B, L, C)
        probs = torch.full((B,), self.cfg.decoder_prob, device=generator.device)
        dec = torch.bernoulli(probs, generator=generator).to(device)
        return ElfDraws(label_drop, t, eps, dec, randn(B * L), randn(B, L, C), rand(B), rand(B))

    def loss(self, batch: TokenBatch, draws: ElfDraws) -> LossOutput:
        """Compute the spec §3.3 loss of ``batch`` for given draws.

        Args:
            batch: ``ids`` (B, L) int64, ``mask`` (B, L) bool validity, ``cond_mask`` (B, L) bool condition.
            draws: the raw random draws of this step.

        Returns:
            The loss (scalar, single denominator over all rows) and the per-branch token means
            ``l2_loss`` (denoiser rows) and ``ce_loss`` (decoder rows).
        """
        cfg, flow = self.cfg, self.flow
        B, L = batch.ids.shape
        cond_mask = batch.cond_mask  # (B, L) bool
        drop = None if draws.label_drop is None else draws.label_drop < cfg.label_drop_prob  # (B,) bool
        x0 = self.embedder.encode(batch.ids, encoder_mask(batch.mask, cond_mask, drop))  # (B, L, C), step 1
        valid = batch.mask if self.pad_token == "pad" else torch.ones_like(batch.mask)
        loss_mask = (valid & ~cond_mask).float()  # (B, L), step 2

        t = _logit_normal(draws.t, cfg.p_mean, cfg.p_std) if cfg.time_schedule == "logit_normal" else draws.t
        z = torch.where(cond_mask[..., None], x0, flow.interpolate(x0, draws.eps, t))  # (B, L, C), step 3
        if drop is not None:  # step 4: dropped rows lose their condition latents in z and x0
            keep = ~(drop[:, None] & cond_mask)[..., None]  # (B, L, 1)
            z, x0 = z * keep, x0 * keep
        z_dec = decoder_input(x0, draws.lam, draws.eps_dec, cfg)  # (B, L, C), step 5, no restore
        v_target = flow.velocity_from_x(x0, z, t)  # (B, L, C), step 6

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
            v_u, v_c = flow.velocity_from_x(out_u, z, t), flow.velocity_from_x(out_c, z, t)
            target = v_target + use_sc * (1 - 1 / w)[:, None, None] * (v_c - v_u)

        # step 11: per-token losses in fp32; decoder rows' l2 also uses (z, t) but is masked out
        # CE only on decoder rows (K, L); the other rows' CE is 0 and masked out, as it was when computed in full
        ce_rows = F.cross_entropy(logits.float().flatten(0, 1), batch.ids[rows].flatten(), reduction="none")
        ce = torch.zeros(B, L, device=ce_rows.device).index_copy(0, rows, ce_rows.view(-1, L))  # (B, L)
        l2 = (flow.velocity_from_x(out.float(), z, t) - target).pow(2).mean(dim=-1)  # (B, L)
        return _combine(ce, l2, loss_mask, dec)

    def _denoise(self, z: Tensor, self_cond: Tensor, t: Tensor, w: Tensor) -> Tensor:
        """Run the network as a pure denoiser on [z, self_cond] (B, L, 2C); return x̂ (B, L, C) fp32."""
        out, _ = self.network(torch.cat([z, self_cond], dim=-1), t, w)
        return out.float()
