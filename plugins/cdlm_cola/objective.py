"""Cola DLM's training objective (Cola spec §9): Stage 1 (VAE), Stage 2 (joint VAE + DiT) and DiT-only training.

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

Every random draw of a step is made by :meth:`ColaObjective.draw` from the step's generator and held in
:class:`ColaDraws`, so a recorded step (the reference's torch and Python ``random`` draws alike) can be replayed
through :meth:`ColaObjective.loss`. Training times are drawn in Cola's own time τ (1 = noise) by
:meth:`ColaSchedule.sample_tau`, bit for bit the scripts' ``sample_timestep``, and the flow-matching maths stays
in τ: no value goes through core time and back (see :mod:`cdlm_cola.objective_flow` for why).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cdlm.errors import RecipeError
from cdlm.interfaces import LossOutput, Objective, TokenBatch
from cdlm_cola.components import ReferenceVAE
from cdlm_cola.config import ColaConfig
from cdlm_cola.dit import ColaDiT
from cdlm_cola.objective_flow import role_states, sample_groups, two_layout, with_prompt_blocks
from cdlm_cola.objective_vae import kl_between, kl_to_standard_normal, mask_tokens, masked_mean, neg_entropy
from cdlm_cola.schedule import ColaSchedule
from cdlm_cola.vae import ColaTextVAE, Posterior, VaeEncoding, posterior

SAMPLES_PER_CALL = 4
"""Samples per VAE call, and per DiT call when lengths differ: NA attention is dense over a call's samples, so
small groups keep a step linear in the batch size (same numbers as one call; see
:func:`~cdlm_cola.objective_flow.sample_groups`). DiT samples of equal length run as one batch instead
(:meth:`~cdlm_cola.objective_flow.TwoLayout.run`)."""


@dataclass(frozen=True)
class FlowDraws:
    """The random draws of the flow-matching term, per sample i of the batch.

    Attributes:
        block_index: (B,) int64 index into the training block sizes (drawn first: it fixes the shapes below).
        tau: (B,) Cola times τ (1 noise, 0 data), as :meth:`ColaSchedule.sample_tau` draws them (no round trip).
        z1: per sample (n_i, d) N(0, 1) noise.
        prompt_use: per sample (n_i / bs_i,) U[0, 1) prompt-block draws, or None when ``prompt_block_prob`` is 0.
        prompt_split: per sample (n_i / bs_i,) int64 clean-prefix lengths, uniform on ``[1, bs_i − 1]``.
    """

    block_index: Tensor
    tau: Tensor
    z1: list[Tensor]
    prompt_use: list[Tensor] | None
    prompt_split: list[Tensor] | None


@dataclass(frozen=True)
class ColaDraws:
    """Every random draw of one training step, in draw order; None where the stage draws nothing.

    Attributes:
        flow: the flow-matching draws (stages ``joint`` and ``dit``).
        posterior_eps: per sample (n_i, d) N(0, 1) noise of the posterior sample ``μ + σ·ε``; None when no
            sample is needed (``dit`` stage with ``vae_mode: mode``).
        mask_u: per sample (L_i,) U[0, 1) token-masking draws (stages ``vae`` and ``joint`` with L_mask).
        mask_eps: per sample (n_i, d) N(0, 1) posterior noise of the masked copy.
    """

    flow: FlowDraws | None
    posterior_eps: list[Tensor] | None
    mask_u: list[Tensor] | None
    mask_eps: list[Tensor] | None


@dataclass(frozen=True)
class _Rows:
    """The batch as per-sample rows padded to their block multiple: ids, real-token and prompt masks (L_i,)."""

    ids: list[Tensor]
    valid: list[Tensor]
    cond: list[Tensor]

    @staticmethod
    def pad(batch: TokenBatch, multiples: list[int], pad_id: int) -> _Rows:
        """Pad row i of ``batch`` with ``pad_id`` (not real, not prompt) to a multiple of ``multiples[i]``."""
        L = batch.ids.shape[1]
        ids, valid, cond = [], [], []
        for i, m in enumerate(multiples):
            extra = -L % m
            ids.append(F.pad(batch.ids[i], (0, extra), value=pad_id))  # (L_i,)
            valid.append(F.pad(batch.mask[i], (0, extra), value=False))
            cond.append(F.pad(batch.cond_mask[i], (0, extra), value=False))
        return _Rows(ids, valid, cond)

    def per_latent(self, patch_size: int) -> tuple[list[Tensor], list[Tensor]]:
        """Return per sample (n_i,) bool: latents with a real token, latents made of prompt tokens only."""
        valid = [v.view(-1, patch_size).any(dim=-1) for v in self.valid]
        cond = [c.view(-1, patch_size).all(dim=-1) for c in self.cond]
        return valid, cond


class ColaObjective(Objective):
    """The Cola training loss of ``cfg.stage`` over a batch of token rows (see the module docstring).

    Args:
        cfg: the Cola model section (stage, loss weights, time distribution, block sizes, token ids).
        vae: the Text VAE (trained in ``vae`` / ``joint``, frozen in ``dit``).
        dit: the DiT prior (unused in ``vae``).
        ref_vae: the frozen reference encoder ``q_φref`` of Stage 2's KL anchor; needed when ``stage: joint``
            and ``ref_kl_weight > 0``. A joint step anchors it to ``vae`` first (:meth:`ReferenceVAE.anchor`:
            at the first step of the run, which is when joint training starts).
        schedule: the Cola flow schedule; it draws the training times.

    Raises:
        RecipeError: a VAE-training stage on a VAE without a Gaussian posterior, or a missing reference encoder.
    """

    def __init__(
        self,
        cfg: ColaConfig,
        vae: ColaTextVAE,
        dit: ColaDiT,
        ref_vae: ReferenceVAE | None,
        schedule: ColaSchedule,
    ) -> None:
        if (cfg.stage != "dit" or cfg.vae_mode == "sample") and not vae.config.use_variation:
            raise RecipeError(
                f"model.stage={cfg.stage!r} with vae_mode={cfg.vae_mode!r} needs the VAE's Gaussian posterior: set "
                "vae.use_variation: true (or train the DiT alone on the mode: stage: dit, vae_mode: mode)"
            )
        if cfg.stage == "joint" and cfg.ref_kl_weight > 0 and ref_vae is None:
            raise RecipeError("model.stage='joint' with ref_kl_weight > 0 needs the frozen reference VAE (ref_vae)")
        self.cfg, self.vae, self.dit, self.ref_vae, self.schedule = cfg, vae, dit, ref_vae, schedule
        self.block_sizes = cfg.block_sizes or [dit.config.block_size]
        probs = cfg.block_size_probs or [1.0] * len(self.block_sizes)
        self.block_size_probs = torch.tensor(probs, dtype=torch.float64)
        self.masking = cfg.stage != "dit" and cfg.mask_weight > 0 and cfg.mask_ratio > 0

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Draw this step's random numbers from ``generator`` and compute the loss of ``batch``."""
        if self.ref_vae is not None and self.cfg.stage == "joint":
            self.ref_vae.anchor(self.vae)
        return self.loss(batch, self.draw(batch, generator))

    def draw(self, batch: TokenBatch, generator: torch.Generator) -> ColaDraws:
        """Draw every random number of one step from ``generator`` (on its device, then moved to the batch's).

        Order: block sizes, posterior noise, masking draws and the masked copy's posterior noise, times, z_1,
        prompt-block draws.

        Args:
            batch: the micro-batch; ``ids`` (B, L) fixes the shapes.
            generator: the only source of randomness.

        Returns:
            The draws (see :class:`ColaDraws`).
        """
        cfg, device, gen = self.cfg, batch.ids.device, generator
        B, L = batch.ids.shape
        ps, d = self.vae.config.patch_size, self.vae.config.latent_dim
        flow = cfg.stage != "vae"

        def randn(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, device=gen.device).to(device)

        def rand(*shape: int) -> Tensor:
            return torch.rand(shape, generator=gen, device=gen.device).to(device)

        index = torch.multinomial(self.block_size_probs, B, replacement=True, generator=gen) if flow else None
        sizes = [self.block_sizes[i] for i in index.tolist()] if index is not None else [1] * B
        lens = [L + (-L % (ps * bs)) for bs in sizes]  # tokens per padded row
        sampled = cfg.stage != "dit" or cfg.vae_mode == "sample"
        posterior_eps = [randn(n // ps, d) for n in lens] if sampled else None
        mask_u = [rand(n) for n in lens] if self.masking else None
        mask_eps = [randn(n // ps, d) for n in lens] if self.masking else None
        if index is None:
            return ColaDraws(None, posterior_eps, mask_u, mask_eps)
        tau = self.schedule.sample_tau(B, gen).to(device)
        z1 = [randn(n // ps, d) for n in lens]
        blocks = [n // (ps * bs) for n, bs in zip(lens, sizes, strict=True)]
        use = [rand(nb) for nb in blocks] if cfg.prompt_block_prob > 0 else None
        split = None
        if use is not None:
            split = [torch.randint(1, max(bs, 2), (nb,), generator=gen, device=gen.device).to(device)
                     for nb, bs in zip(blocks, sizes, strict=True)]  # fmt: skip
        return ColaDraws(FlowDraws(index.to(device), tau, z1, use, split), posterior_eps, mask_u, mask_eps)

    def loss(self, batch: TokenBatch, draws: ColaDraws) -> LossOutput:
        """Compute the loss of ``cfg.stage`` on ``batch`` for given draws.

        Args:
            batch: ``ids`` (B, L) int64, ``mask`` (B, L) bool real tokens, ``cond_mask`` (B, L) bool prompts.
            draws: every random draw of the step.

        Returns:
            The loss and its parts: ``recon_ce``, ``recon_acc``, ``kl`` (Stage 1) or ``neg_entropy`` (Stage 2),
            ``mask_ce``, ``fm``, ``ref_kl``, as the stage has them.
        """
        cfg, ps = self.cfg, self.vae.config.patch_size
        sizes = [1] * batch.ids.shape[0]
        if draws.flow is not None:
            sizes = [self.block_sizes[i] for i in draws.flow.block_index.tolist()]
        rows = _Rows.pad(batch, [ps * bs for bs in sizes], cfg.pad_id)
        if cfg.stage == "dit":
            with torch.no_grad():
                enc = self._encode(rows.ids)
            if draws.posterior_eps is None:
                z = torch.cat(enc.latents)  # the posterior mode (Σn, d)
            else:
                z = _sample(_posterior(enc), draws.posterior_eps)
            fm = self._flow_matching(z, rows, sizes, draws)
            return LossOutput(fm, {"fm": float(fm.detach())})
        terms, post, z = self._vae_terms(rows, draws)
        metrics = {name: float(value.detach()) for name, value in terms.items()}
        reg = terms["kl"] if cfg.stage == "vae" else terms["neg_entropy"]
        loss = cfg.recon_weight * (terms["recon_ce"] + cfg.kl_weight * reg + cfg.mask_weight * terms["mask_ce"])
        if cfg.stage == "vae":
            return LossOutput(loss, metrics)
        fm = self._flow_matching(z if cfg.vae_mode == "sample" else post.mean, rows, sizes, draws)
        loss = loss + cfg.fm_weight * fm
        metrics["fm"] = float(fm.detach())
        if self.ref_vae is not None and cfg.ref_kl_weight > 0:
            with torch.no_grad():
                ref = _posterior(self._encode(rows.ids, self.ref_vae))
            valid, _ = rows.per_latent(ps)
            ref_kl = masked_mean(kl_between(post, ref), torch.cat(valid))
            loss = loss + cfg.ref_kl_weight * ref_kl
            metrics["ref_kl"] = float(ref_kl.detach())
        return LossOutput(loss, metrics)

    def _encode(self, ids: list[Tensor], vae: ColaTextVAE | None = None) -> VaeEncoding:
        """Encode rows (L_i,) with ``vae`` (default: the trained one), :data:`SAMPLES_PER_CALL` at a time."""
        latents, params = [], []
        for group in sample_groups(len(ids), SAMPLES_PER_CALL):
            enc = (vae or self.vae).encode(ids[group])
            latents += enc.latents
            params += enc.params or []
        return VaeEncoding(latents, params or None)

    def _decode(self, z: Tensor, n_lens: list[int]) -> Tensor:
        """Decode latents z (Σn_i, d) of samples with n_i latents each into fp32 logits (ΣL_i, V)."""
        parts = z.split(n_lens)
        groups = sample_groups(len(n_lens), SAMPLES_PER_CALL)
        return torch.cat([self.vae.decode(torch.cat(parts[g]), n_lens[g], n_lens[g]) for g in groups]).float()

    def _vae_terms(self, rows: _Rows, draws: ColaDraws) -> tuple[dict[str, Tensor], Posterior, Tensor]:
        """Reconstruct the rows (and their masked copies) through a posterior sample.

        Returns:
            The terms (``recon_ce``, ``recon_acc``, ``kl`` or ``neg_entropy``, ``mask_ce``), the rows' posterior
            with (Σn, d) moments and its sample z (Σn, d).
        """
        cfg, mask_id = self.cfg, self.vae.config.vocab_size
        assert draws.posterior_eps is not None
        ids, eps = list(rows.ids), list(draws.posterior_eps)
        masked: list[Tensor] = []
        if draws.mask_u is not None and draws.mask_eps is not None:
            pairs = [
                mask_tokens(r, v, u, cfg.mask_ratio, mask_id)
                for r, v, u in zip(ids, rows.valid, draws.mask_u, strict=True)
            ]
            ids += [corrupted for corrupted, _ in pairs]
            masked = [positions for _, positions in pairs]
            eps += draws.mask_eps
        post = _posterior(self._encode(ids))  # rows first, then their masked copies
        z_all = _sample(post, eps)  # (Σn, d)
        n_lens = [r.numel() // self.vae.config.patch_size for r in ids]
        logits = self._decode(z_all, n_lens)  # (ΣL, V)
        targets = torch.cat(list(rows.ids) * (2 if masked else 1))  # masked copies predict the original tokens
        ce = F.cross_entropy(logits, targets, reduction="none")  # (ΣL,)
        n_tokens, n_latents = sum(r.numel() for r in rows.ids), sum(n_lens[: len(rows.ids)])
        valid = torch.cat(rows.valid)
        terms = {
            "recon_ce": masked_mean(ce[:n_tokens], valid),
            "recon_acc": masked_mean((logits[:n_tokens].argmax(dim=-1) == targets[:n_tokens]).float(), valid),
        }
        rows_post = Posterior(*(moment[:n_latents] for moment in post))
        latent_valid = torch.cat(rows.per_latent(self.vae.config.patch_size)[0])
        if cfg.stage == "vae":
            terms["kl"] = masked_mean(kl_to_standard_normal(rows_post), latent_valid)
        else:
            terms["neg_entropy"] = masked_mean(neg_entropy(rows_post), latent_valid)
        terms["mask_ce"] = masked_mean(ce[n_tokens:], torch.cat(masked)) if masked else ce.new_zeros(())
        return terms, rows_post, z_all[:n_latents]

    def _flow_matching(self, z: Tensor, rows: _Rows, sizes: list[int], draws: ColaDraws) -> Tensor:
        """Return ``L_FM`` () for the rows' VAE latents z (Σn, d) at the drawn times, noise and prompt blocks."""
        cfg, vae_cfg, flow = self.cfg, self.vae.config, draws.flow
        assert flow is not None
        valid, cond = rows.per_latent(vae_cfg.patch_size)
        n_lens = [v.numel() for v in valid]
        z0 = ((z.float() - vae_cfg.shifting_factor) * vae_cfg.scaling_factor).split(n_lens)  # spec §5
        states = []
        for i, (c, bs) in enumerate(zip(cond, sizes, strict=True)):
            s = role_states(c, bs, cfg.loss_mode, cfg.boundary_mode)
            if flow.prompt_use is not None and flow.prompt_split is not None:
                s = with_prompt_blocks(s, bs, flow.prompt_use[i], flow.prompt_split[i], cfg.prompt_block_prob)
            states.append(s)
        trained = valid if cfg.padding_loss == "masked" else [torch.ones_like(v) for v in valid]  # cola_cpt.py
        batch = two_layout(z0, flow.z1, flow.tau, states, trained, sizes, cfg.time_scale)
        return batch.loss(batch.run(self.dit, SAMPLES_PER_CALL))


def _posterior(enc: VaeEncoding) -> Posterior:
    """Return the posterior with (Σn_i, d) moments of an encoding's samples."""
    assert enc.params is not None  # use_variation, checked in ColaObjective.__init__
    return posterior(torch.cat(enc.params))


def _sample(post: Posterior, eps: list[Tensor]) -> Tensor:
    """Return the reparameterised posterior sample ``μ + σ·ε`` (Σn, d) for per-sample noise (n_i, d)."""
    return post.mean + post.std * torch.cat(eps)
