"""ELF's progressive-distillation step (ELF spec §8).

PD rows regress the teacher's implied x-target, decoder rows train the decoder head by cross-entropy, and
self-conditioned PD rows see the teacher's x̂ as their second half.

The teacher target itself is the core's (:mod:`cdlm.training.distill`): the frozen teacher's ELF DenoiseFn is
integrated by the shared Euler solver over each row's sub-step grid. As in :mod:`cdlm_elf.objective`, the random
draws (:meth:`ElfDistillObjective.draw`) are split from the maths (:meth:`ElfDistillObjective.loss`) so that the
recorded reference step (``fixtures/elf/pd_step``) can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cdlm.interfaces import LossOutput, Objective, TokenBatch
from cdlm.objective import token_cross_entropy
from cdlm.sampling.types import Prediction
from cdlm.training.distill import (
    Teacher,
    per_example_mean,
    student_times,
    teacher_grid,
    teacher_target,
)
from cdlm_elf.conditioning import ElfCond
from cdlm_elf.config import ElfConfig
from cdlm_elf.embedder import T5Embedder, encoder_mask
from cdlm_elf.model import ElfTransformer
from cdlm_elf.objective import decoder_input, loss_mask, sc_scale
from cdlm_elf.pipeline import elf_denoise_fn
from cdlm_elf.schedule import ElfSchedule


@dataclass(frozen=True)
class ElfDistillDraws:
    """The random draws of one distillation step, in call order (spec §8 "Per-step random draws").

    Attributes:
        dec: (B,) Bernoulli(``decoder_prob``) as float, 1 = decoder (CE) row.
        u: (B,) student training times (``schedule.sample_t``), rescaled into [0, 1 − Δ] by the step.
        sc_scale: (B,) U[0, 1), mapped to the SC-CFG scale w with log-uniform 1 + w.
        lam: (B·L,) N(0, 1) logits of the per-token decoder mixing coefficient λ.
        eps_dec: (B, L, C) N(0, 1) decoder noise (before ×``decoder_noise_scale``).
        eps: (B, L, C) N(0, 1) noise of ``z_{t_s}`` (scaled by ``noise_scale`` on the path).
        sc_coin: (B,) Bernoulli(``self_cond_prob``) as float, or None when ``self_cond_prob`` is 0 (not drawn).
        inner: (B, n − 1) teacher sub-step times (``schedule.sample_t``), unsorted; (B, 0) when n = 1.
    """

    dec: Tensor
    u: Tensor
    sc_scale: Tensor
    lam: Tensor
    eps_dec: Tensor
    eps: Tensor
    sc_coin: Tensor | None
    inner: Tensor


class ElfDistillObjective(Objective):
    """The ELF progressive-distillation loss (spec §8): mean over rows of ``dec·CE_b + (1 − dec)·PD_b``.

    Args:
        cfg: the ELF model config; ``cfg.distill`` holds the round (``steps``, ``teacher_steps``).
        embedder: the frozen T5 embedder producing the clean latents x0.
        network: the student ELF network.
        schedule: the path, shared by student and teacher (``sample_t``, ``interpolate``, ``predict``).
        teacher: the frozen teacher (an ELF Denoiser).
        pad_token: ``"pad"`` masks padding out of the loss; ``"eos"`` trains it (``data.pad_token``).
    """

    def __init__(
        self,
        cfg: ElfConfig,
        embedder: T5Embedder,
        network: ElfTransformer,
        schedule: ElfSchedule,
        teacher: Teacher,
        *,
        pad_token: Literal["pad", "eos"] = "pad",
    ) -> None:
        assert cfg.distill is not None  # the build passes a distillation config
        self.cfg, self.settings, self.embedder, self.network = cfg, cfg.distill, embedder, network
        self.schedule, self.teacher, self.pad_token = schedule, teacher, pad_token

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Draw this step's random numbers from ``generator`` and compute the loss of ``batch``."""
        return self.loss(batch, self.draw(batch, generator))

    def draw(self, batch: TokenBatch, generator: torch.Generator) -> ElfDistillDraws:
        """Draw every random number of one step from ``generator``, in the spec §8 order."""
        B, L = batch.ids.shape
        C, device, n = self.cfg.latent_dim, batch.ids.device, self.settings.teacher_steps

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=generator, device=generator.device).to(device)

        def coin(p: float) -> Tensor:
            return torch.bernoulli(torch.full((B,), p, device=generator.device), generator=generator).to(device)

        dec = coin(self.cfg.decoder_prob)
        u = self.schedule.sample_t(B, generator).to(device)
        w = torch.rand(B, generator=generator, device=generator.device).to(device)
        lam, eps_dec, eps = randn(B * L), randn(B, L, C), randn(B, L, C)
        sc_coin = coin(self.cfg.self_cond_prob) if self.cfg.self_cond_prob > 0 else None
        inner = self.schedule.sample_t(B * (n - 1), generator).to(device).view(B, n - 1)
        return ElfDistillDraws(dec, u, w, lam, eps_dec, eps, sc_coin, inner)

    def loss(self, batch: TokenBatch, draws: ElfDistillDraws) -> LossOutput:
        """Compute the spec §8 loss of ``batch`` for given draws.

        Returns:
            The loss and the per-branch row means ``ce_loss`` (decoder rows) and ``l2_loss`` (PD rows).
        """
        cfg = self.cfg
        cond_mask = batch.cond_mask  # (B, L) bool
        x0 = self.embedder.encode(batch.ids, encoder_mask(batch.mask, cond_mask))  # (B, L, C)
        mask = loss_mask(batch, self.pad_token)  # (B, L)

        dec = draws.dec  # (B,) 1 = decoder row
        span_s, span_t = student_times(draws.u, self.settings.steps)
        t_s = torch.where(dec > 0, torch.ones_like(span_s), span_s)  # (B,) decoder rows at t = 1
        t_t = torch.where(dec > 0, torch.ones_like(span_t), span_t)
        w = sc_scale(draws.sc_scale, cfg)  # (B,)
        cond = ElfCond(sc_scale=w, values=x0, mask=cond_mask)
        z_dec = decoder_input(x0, draws.lam, draws.eps_dec, cfg)  # (B, L, C), no restore
        z = cond.restore(self.schedule.interpolate(x0, draws.eps, t_s))  # (B, L, C) z_{t_s}
        row = dec[:, None, None]  # (B, 1, 1)

        pd = (dec == 0).nonzero().squeeze(1)  # (P,) PD rows: the only ones the teacher runs on
        sc_half = cond.restore(torch.zeros_like(z))  # (B, L, C)
        target = torch.zeros_like(z)
        if pd.numel():
            sc_half, target = self._teacher(z, t_s, t_t, sc_half, cond, pd, draws)

        rows = dec.nonzero().squeeze(1)  # (K,) decoder rows: the only ones whose logits reach the loss
        z_in = row * z_dec + (1 - row) * z  # (B, L, C)
        out, logits = self.network(torch.cat([z_in, sc_half], dim=-1), t_s, w, decode_gate=dec, logit_rows=rows)
        assert logits is not None  # decode_gate is a tensor, so the decoder head ran
        ce = token_cross_entropy(logits, batch.ids[rows])  # (K, L)
        ce_rows = per_example_mean(ce, mask[rows])  # (K,) CE_b
        l2 = (out[pd].float() - target[pd]).pow(2).mean(dim=-1)  # (P, L) x-space, unweighted
        pd_rows = per_example_mean(l2, mask[pd])  # (P,) PD_b
        loss = (ce_rows.sum() + pd_rows.sum()) / dec.numel()  # mean_b(dec·CE_b + (1 − dec)·PD_b)
        metrics = {
            "ce_loss": float(ce_rows.detach().sum() / max(rows.numel(), 1)),
            "l2_loss": float(pd_rows.detach().sum() / max(pd.numel(), 1)),
        }
        return LossOutput(loss=loss, metrics=metrics)

    def _teacher(
        self, z: Tensor, t_s: Tensor, t_t: Tensor, sc_half: Tensor, cond: ElfCond, pd: Tensor, draws: ElfDistillDraws
    ) -> tuple[Tensor, Tensor]:
        """Return the self-conditioning half (B, L, C) and the teacher's x-target (B, L, C, zero off the PD rows).

        Self-conditioned PD rows (``sc_coin``) take the teacher's x̂ at ``(z_{t_s}, t_s)`` with a zero second half;
        the same half seeds the teacher's first sub-step (spec §8 "Self-conditioning half", "Teacher target").
        """
        assert cond.values is not None and cond.mask is not None  # built by loss() with both
        denoise = elf_denoise_fn(self.teacher.denoiser(z.device), self.schedule)  # type: ignore[arg-type]
        sub = ElfCond(cond.sc_scale[pd], cond.values[pd], cond.mask[pd])  # the PD rows' conditioning

        def predict(z_: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
            return denoise(z_, t, x_prev, sub)

        z_pd, t_pd, half = z[pd], t_s[pd], sc_half[pd]  # (P, L, C), (P,), (P, L, C)
        if draws.sc_coin is not None:
            with torch.no_grad():
                x_init = predict(z_pd, t_pd, half).x  # (P, L, C)
            half = sub.restore(x_init * draws.sc_coin[pd, None, None])
            sc_half = sc_half.index_copy(0, pd, half)
        grid = teacher_grid(t_pd, t_t[pd], draws.inner[pd])  # (P, n + 1)
        x_target = teacher_target(predict, z_pd, grid, half, constrain=sub.restore)  # (P, L, C)
        return sc_half, torch.zeros_like(z).index_copy(0, pd, x_target)
