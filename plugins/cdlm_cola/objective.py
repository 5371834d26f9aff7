"""Cola DLM's training objectives (Cola spec §9): Stage 1 (VAE), Stage 2 (joint VAE + DiT) and DiT-only training.

With ``λ_VAE = recon_weight``, ``β = kl_weight``, ``λ_mask = mask_weight``, ``λ_fm = fm_weight`` and
``λ_ref = ref_kl_weight`` (per ``model.stage``):

* ``vae``:   ``λ_VAE·(CE + β·KL(q ‖ N(0, I)) + λ_mask·L_mask)``; the paper's ``L_VAE`` at the default λ_VAE = 1;
* ``joint``: ``λ_VAE·(CE + β·E_q log q + λ_mask·L_mask) + λ_fm·L_FM + λ_ref·KL(q ‖ q_ref)``, spec §9.1;
* ``dit``:   ``L_FM`` on the latents of the frozen VAE, exactly the community scripts' step (spec §9.2).

The paper's training code is not public, so where it is silent these choices hold:

* CE is position-aligned (token j from latent ⌊j/ps⌋, no shift, as the decoder is built), decoded from a
  reparameterised posterior sample and averaged over real tokens (``batch.mask``). Regularisers are summed over
  the d channels and averaged over real latents (a latent is real when one of its tokens is).
* ``L_mask``: every real token is replaced by ``[MASK]`` (id ``vae.vocab_size``, the extra ``wte`` row) with
  probability ``mask_ratio``; the corrupted rows are encoded and decoded as extra samples of the same NA calls,
  and CE against the original tokens is averaged over the masked positions only.
* ``L_FM`` (:mod:`cdlm_cola.objective_flow`): ``z_0 = (z − shift)·scale`` with z the posterior sample the CE used
  (``vae_mode: sample``) or the mean (``mode``). In Stage 2 gradients reach the encoder through the noisy copy
  and the target ``z_1 − z_0``; the clean history half is detached, ``sg(z_0^(<b))``.
* Rows are padded with ``pad_id`` to a multiple of ``patch_size·bs_i`` (bs_i the sample's drawn block size), as
  the scripts pad with their stop token. Padding latents (no real token: the block padding and the data's fill,
  ``batch.mask == False``) are noised like the rest but by default never trained, as in ``cola_pretrain.py``;
  ``padding_loss: trained`` trains them in ``L_FM``, as ``cola_cpt.py`` does (its loss mask is all ones, spec
  §9.2). The VAE terms always average over real tokens only.
  ``batch.cond_mask`` marks prompt latents for ``loss_mode: sft`` (responses are the rest, padding included).

Stage 1 is not flow matching: :class:`~cdlm_cola.objective_vae.ColaVaeObjective` is the VAE terms alone. The
flow stages are :class:`ColaObjective`, the core's :class:`~cdlm.objective.FlowMatchingObjective` extended where
Cola differs: its draws (:class:`ColaDraws`), its latents (the VAE posterior of rows padded per sample to whole
blocks) and its terms (the 2L layout, plus the VAE terms and the anchor in ``joint``). :func:`objective_for`
picks the stage's. Every random draw of a step is made by ``draw`` from the step's generator, so a recorded step
(the reference's torch and Python ``random`` draws alike) can be replayed through ``loss``. Training times are
drawn in Cola's own time τ (1 = noise) by :meth:`ColaSchedule.sample_tau`, bit for bit the scripts'
``sample_timestep``, and the flow-matching maths stays in τ: no value goes through core time and back (see
:mod:`cdlm_cola.objective_flow` for why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cdlm.errors import RecipeError
from cdlm.interfaces import LossOutput, Objective, TokenBatch
from cdlm.objective import FlowDraws, FlowMatchingObjective, LossTerm, combine
from cdlm_cola.components import ColaDenoiser, ColaEmbedder, ReferenceVAE
from cdlm_cola.config import ColaConfig
from cdlm_cola.dit import ColaDiT
from cdlm_cola.objective_flow import SAMPLES_PER_CALL, role_states, two_layout, with_prompt_blocks
from cdlm_cola.objective_vae import (
    ColaVaeObjective,
    PaddedRows,
    VaeDraws,
    VaeTerms,
    draw_normal,
    draw_uniform,
    kl_between,
    reparameterised,
    require_posterior,
)
from cdlm_cola.schedule import ColaSchedule
from cdlm_cola.vae import ColaTextVAE


@dataclass(frozen=True)
class ColaDraws(FlowDraws):
    """Every random draw of one flow-matching step, in draw order.

    The order: ``block_index``, ``vae``, ``t``, ``eps``, ``prompt_use``, ``prompt_split``.

    Attributes:
        t: (B,) training times in Cola's own time τ (1 noise, 0 data), as :meth:`ColaSchedule.sample_tau` draws
            them: the 2L layout reads them as they are (no round trip through core time).
        eps: (Σn_i, d) N(0, 1) noise z_1 of the samples' latents, sample after sample, drawn per sample (a row's
            n_i latents follow from its block size).
        block_index: (B,) int64 index into the training block sizes (drawn first: it fixes the padded lengths).
        vae: the VAE's draws for the padded rows: posterior noise (``joint``, or ``vae_mode: sample``), masking
            (``joint`` with ``L_mask``).
        prompt_use: per sample (n_i / bs_i,) U[0, 1) prompt-block draws, or None when ``prompt_block_prob`` is 0.
        prompt_split: per sample (n_i / bs_i,) int64 clean-prefix lengths, uniform on ``[1, bs_i − 1]``.
    """

    block_index: Tensor
    vae: VaeDraws
    prompt_use: list[Tensor] | None
    prompt_split: list[Tensor] | None


class ColaObjective(FlowMatchingObjective):
    """The loss of Cola's flow stages, ``joint`` and ``dit`` (see the module docstring), over token rows.

    The core's step stays: draw, then the loss of the draws; the flow term is a per-latent
    :class:`~cdlm.objective.LossTerm` (reduced by the core's :func:`~cdlm.objective.combine` in ``dit``) against
    the schedule's target. What Cola changes: :meth:`draw` (block sizes, the VAE's draws, τ, per-sample noise,
    prompt blocks) and :meth:`loss` (rows padded per sample, the VAE posterior as latents, the 2L layout, and in
    ``joint`` the VAE terms and the anchor). Training runs the networks in its own layouts (the VAE a few samples
    per call, the DiT on 2L rows), not through the ``embedder`` and ``denoiser`` the core keeps.

    Args:
        cfg: the Cola model section (stage, loss weights, time distribution, block sizes, token ids).
        vae: the Text VAE (trained in ``joint``, frozen in ``dit``).
        dit: the DiT prior.
        ref_vae: the frozen reference encoder ``q_φref`` of Stage 2's KL anchor; needed when ``stage: joint``
            and ``ref_kl_weight > 0``. A joint step anchors it to ``vae`` first (:meth:`ReferenceVAE.anchor`:
            at the first step of the run, which is when joint training starts).
        schedule: the Cola flow schedule: training times and the path in τ.

    Raises:
        RecipeError: a stage that samples the posterior on a VAE without one, or a missing reference encoder.
    """

    schedule: ColaSchedule

    def __init__(
        self, cfg: ColaConfig, vae: ColaTextVAE, dit: ColaDiT, ref_vae: ReferenceVAE | None, schedule: ColaSchedule
    ) -> None:
        assert cfg.stage != "vae", "stage vae is not flow matching: objective_for builds ColaVaeObjective"
        require_posterior(cfg, vae)
        if cfg.stage == "joint" and cfg.ref_kl_weight > 0 and ref_vae is None:
            raise RecipeError("model.stage='joint' with ref_kl_weight > 0 needs the frozen reference VAE (ref_vae)")
        super().__init__(ColaEmbedder(vae), ColaDenoiser(dit, schedule), schedule)
        self.cfg, self.vae, self.dit, self.ref_vae = cfg, vae, dit, ref_vae
        self.vae_terms = VaeTerms(cfg, vae)
        self.block_sizes = cfg.block_sizes or [dit.config.block_size]
        probs = cfg.block_size_probs or [1.0] * len(self.block_sizes)
        self.block_size_probs = torch.tensor(probs, dtype=torch.float64)

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Anchor the reference encoder (``joint``; once per run), then take the core's step: draw, then loss."""
        if self.ref_vae is not None and self.cfg.stage == "joint":
            self.ref_vae.anchor(self.vae)
        return super().__call__(batch, generator)

    def draw(self, batch: TokenBatch, generator: torch.Generator) -> ColaDraws:
        """Draw every random number of one step from ``generator`` (on its device, then moved to the batch's).

        Args:
            batch: the micro-batch; ``ids`` (B, L) fixes the shapes.
            generator: the only source of randomness.

        Returns:
            The draws, in the order of :class:`ColaDraws`.
        """
        cfg, device, gen = self.cfg, batch.ids.device, generator
        B, L = batch.ids.shape
        ps, d = self.vae.config.patch_size, self.vae.config.latent_dim
        index = torch.multinomial(self.block_size_probs, B, replacement=True, generator=gen)
        sizes = [self.block_sizes[i] for i in index.tolist()]
        lens = [L + (-L % (ps * bs)) for bs in sizes]  # tokens per padded row
        vae = self.vae_terms.draw(lens, cfg.stage == "joint" or cfg.vae_mode == "sample", gen, device)
        tau = self.schedule.sample_tau(B, gen).to(device)  # (B,)
        z1 = torch.cat([draw_normal(gen, device, n // ps, d) for n in lens])  # (Σn, d)
        blocks = [n // (ps * bs) for n, bs in zip(lens, sizes, strict=True)]
        use = split = None
        if cfg.prompt_block_prob > 0:
            use = [draw_uniform(gen, device, nb) for nb in blocks]
            split = [torch.randint(1, max(bs, 2), (nb,), generator=gen, device=gen.device).to(device)
                     for nb, bs in zip(blocks, sizes, strict=True)]  # fmt: skip
        return ColaDraws(t=tau, eps=z1, block_index=index.to(device), vae=vae, prompt_use=use, prompt_split=split)

    def loss(self, batch: TokenBatch, draws: ColaDraws) -> LossOutput:
        """Compute the loss of ``cfg.stage`` on ``batch`` for given draws.

        Args:
            batch: ``ids`` (B, L) int64, ``mask`` (B, L) bool real tokens, ``cond_mask`` (B, L) bool prompts.
            draws: every random draw of the step.

        Returns:
            The loss and its parts: ``fm`` (``dit``); ``recon_ce``, ``recon_acc``, ``neg_entropy``, ``mask_ce``,
            ``fm`` and ``ref_kl`` (``joint``).
        """
        cfg, ps = self.cfg, self.vae.config.patch_size
        sizes = [self.block_sizes[i] for i in draws.block_index.tolist()]
        rows = PaddedRows.pad(batch, [ps * bs for bs in sizes], cfg.pad_id)
        if cfg.stage == "dit":
            term = self.flow_term(self._frozen_latents(rows, draws.vae), rows, sizes, draws)
            return combine({"fm": term}, term.mask)
        vae = self.vae_terms(rows, draws.vae)
        fm = self.flow_term(vae.z if cfg.vae_mode == "sample" else vae.posterior.mean, rows, sizes, draws).mean()
        loss = vae.loss + cfg.fm_weight * fm
        metrics = {**vae.metrics, "fm": float(fm.detach())}
        if self.ref_vae is not None and cfg.ref_kl_weight > 0:
            with torch.no_grad():
                ref = self.vae_terms.posterior(rows.ids, self.ref_vae)
            valid, _ = rows.per_latent(ps)
            ref_kl = LossTerm(kl_between(vae.posterior, ref), torch.cat(valid).float()).mean()
            loss = loss + cfg.ref_kl_weight * ref_kl
            metrics["ref_kl"] = float(ref_kl.detach())
        return LossOutput(loss, metrics)

    def flow_term(self, z: Tensor, rows: PaddedRows, sizes: list[int], draws: ColaDraws) -> LossTerm:
        """Return ``L_FM``'s per-latent term for the rows' VAE latents z (Σn, d), in the 2L layout (spec §4.3, §9).

        Args:
            z: (Σn, d) the rows' latents, unscaled (posterior sample or mode).
            rows: the rows padded to their blocks (prompt roles, real tokens).
            sizes: the block size of each sample.
            draws: the step's times, noise and prompt blocks.
        """
        cfg, vae_cfg = self.cfg, self.vae.config
        valid, cond = rows.per_latent(vae_cfg.patch_size)
        z0 = (z.float() - vae_cfg.shifting_factor) * vae_cfg.scaling_factor  # (Σn, d), spec §5
        states = []
        for i, (c, bs) in enumerate(zip(cond, sizes, strict=True)):
            s = role_states(c, bs, cfg.loss_mode, cfg.boundary_mode)
            if draws.prompt_use is not None and draws.prompt_split is not None:
                s = with_prompt_blocks(s, bs, draws.prompt_use[i], draws.prompt_split[i], cfg.prompt_block_prob)
            states.append(s)
        trained = torch.cat(valid)  # (Σn,); cola_cpt.py trains the padding too (its loss mask is all ones)
        if cfg.padding_loss == "trained":
            trained = torch.ones_like(trained)
        lens = [v.numel() for v in valid]
        batch = two_layout(z0, draws.eps, draws.t, torch.cat(states), trained, lens, sizes, self.schedule)
        return batch.term(batch.run(self.dit, SAMPLES_PER_CALL))

    def _frozen_latents(self, rows: PaddedRows, draws: VaeDraws) -> Tensor:
        """Return the frozen VAE's latents (Σn, d) of the rows (``dit``): its posterior mode, or a sample of it."""
        with torch.no_grad():
            if draws.posterior_eps is None:
                return torch.cat(self.vae_terms.encode(rows.ids).latents)
            return reparameterised(self.vae_terms.posterior(rows.ids), draws.posterior_eps)


def objective_for(
    cfg: ColaConfig, vae: ColaTextVAE, dit: ColaDiT, ref_vae: ReferenceVAE | None, schedule: ColaSchedule
) -> Objective:
    """Return the objective of ``cfg.stage``: :class:`ColaVaeObjective` (``vae``) or :class:`ColaObjective`.

    Raises:
        RecipeError: as the objective's constructor.
    """
    if cfg.stage == "vae":
        return ColaVaeObjective(cfg, vae)
    return ColaObjective(cfg, vae, dit, ref_vae, schedule)
