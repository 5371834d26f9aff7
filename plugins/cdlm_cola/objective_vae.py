"""The Text VAE's training terms (Cola spec §9.1), and Stage 1: those terms alone, which is not flow matching.

The paper's Stage 1/2 code is not public; these are its stated terms, per latent (summed over the d channels),
for the diagonal Gaussian posterior ``q(z | x) = N(μ, σ²)`` of :func:`cdlm_cola.vae.posterior` (log-variance
clamped to [−30, 20] as the reference does):

* ``KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²)``, Stage 1's β term with ``p_base = N(0, I)``;
* ``E_q log q = −½ Σ (log 2π + 1 + log σ²)``, Stage 2's β term (the negative entropy: the prior's role passes
  to the DiT through ``L_FM``);
* ``KL(q ‖ q_ref) = ½ Σ (log σ_ref² − log σ² + (σ² + (μ − μ_ref)²) / σ_ref² − 1)``, Stage 2's anchor to the
  frozen reference encoder.

:class:`VaeTerms` computes ``λ_VAE·(CE + β·regulariser + λ_mask·L_mask)`` on rows padded to a block multiple
(:class:`PaddedRows`), from given draws (:class:`VaeDraws`); the choices it makes where the paper is silent are
listed in :mod:`cdlm_cola.objective`. :class:`ColaVaeObjective` is Stage 1; the joint stage adds the same terms to
its flow term (:class:`cdlm_cola.objective.ColaObjective`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cdlm.errors import RecipeError
from cdlm.interfaces import LossOutput, Objective, TokenBatch
from cdlm.objective import LossTerm
from cdlm_cola.config import ColaConfig
from cdlm_cola.objective_flow import SAMPLES_PER_CALL, sample_groups
from cdlm_cola.vae import ColaTextVAE, Posterior, VaeEncoding, posterior

LOG_2PI = math.log(2 * math.pi)


def kl_to_standard_normal(post: Posterior) -> Tensor:
    """Return ``KL(q ‖ N(0, I))`` per latent (N,) for a posterior with (N, d) moments."""
    return 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1.0 - post.logvar).sum(dim=-1)


def neg_entropy(post: Posterior) -> Tensor:
    """Return ``E_q log q`` per latent (N,), the negative differential entropy of a (N, d) posterior."""
    return -0.5 * (LOG_2PI + 1.0 + post.logvar).sum(dim=-1)


def kl_between(post: Posterior, ref: Posterior) -> Tensor:
    """Return ``KL(q ‖ q_ref)`` per latent (N,) between two diagonal Gaussians with (N, d) moments."""
    ratio = (post.logvar - ref.logvar).exp()  # σ² / σ_ref²
    mahalanobis = (post.mean - ref.mean).pow(2) * (-ref.logvar).exp()  # (μ − μ_ref)² / σ_ref²
    return 0.5 * (ratio + mahalanobis - 1.0 - (post.logvar - ref.logvar)).sum(dim=-1)


def mask_tokens(ids: Tensor, valid: Tensor, u: Tensor, ratio: float, mask_id: int) -> tuple[Tensor, Tensor]:
    """Replace a ``ratio`` share of the real tokens by ``[MASK]``, BERT style (spec §8.1, §9.1 ``L_mask``).

    Args:
        ids: (L,) int64 token ids.
        valid: (L,) bool, False on padding (never masked).
        u: (L,) U[0, 1) draws; a real token is masked where ``u < ratio``.
        ratio: share of tokens to mask.
        mask_id: the ``[MASK]`` id, the VAE's extra embedding row ``vocab_size``.

    Returns:
        The corrupted ids (L,) and the masked positions (L,) bool.
    """
    masked = (u < ratio) & valid
    return ids.masked_fill(masked, mask_id), masked


def reparameterised(post: Posterior, eps: list[Tensor]) -> Tensor:
    """Return the posterior sample ``μ + σ·ε`` (Σn, d) of (Σn, d) moments for per-sample noise (n_i, d)."""
    return post.mean + post.std * torch.cat(eps)


def draw_normal(generator: torch.Generator, device: torch.device, *shape: int) -> Tensor:
    """Draw N(0, 1) noise of ``shape`` on the generator's device (device-independent numbers), then move it."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def draw_uniform(generator: torch.Generator, device: torch.device, *shape: int) -> Tensor:
    """Draw U[0, 1) numbers of ``shape`` on the generator's device, then move them."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def require_posterior(cfg: ColaConfig, vae: ColaTextVAE) -> None:
    """Check that a stage that samples the posterior (all but ``dit`` on the mode) has one.

    Raises:
        RecipeError: the VAE has no Gaussian posterior (``use_variation: false``).
    """
    if (cfg.stage != "dit" or cfg.vae_mode == "sample") and not vae.config.use_variation:
        raise RecipeError(
            f"model.stage={cfg.stage!r} with vae_mode={cfg.vae_mode!r} needs the VAE's Gaussian posterior: set "
            "vae.use_variation: true (or train the DiT alone on the mode: stage: dit, vae_mode: mode)"
        )


@dataclass(frozen=True)
class PaddedRows:
    """A batch as per-sample rows padded to their block multiple: ids, real-token and prompt masks (L_i,)."""

    ids: list[Tensor]
    valid: list[Tensor]
    cond: list[Tensor]

    @staticmethod
    def pad(batch: TokenBatch, multiples: list[int], pad_id: int) -> PaddedRows:
        """Pad row i of ``batch`` with ``pad_id`` (not real, not prompt) to a multiple of ``multiples[i]``."""
        L = batch.ids.shape[1]
        ids, valid, cond = [], [], []
        for i, m in enumerate(multiples):
            extra = -L % m
            ids.append(F.pad(batch.ids[i], (0, extra), value=pad_id))  # (L_i,)
            valid.append(F.pad(batch.mask[i], (0, extra), value=False))
            cond.append(F.pad(batch.cond_mask[i], (0, extra), value=False))
        return PaddedRows(ids, valid, cond)

    def per_latent(self, patch_size: int) -> tuple[list[Tensor], list[Tensor]]:
        """Return per sample (n_i,) bool: latents with a real token, latents made of prompt tokens only."""
        valid = [v.view(-1, patch_size).any(dim=-1) for v in self.valid]
        cond = [c.view(-1, patch_size).all(dim=-1) for c in self.cond]
        return valid, cond


@dataclass(frozen=True)
class VaeDraws:
    """The VAE's random draws of one step, per padded row, in draw order; None where the step draws nothing.

    Attributes:
        posterior_eps: per sample (n_i, d) N(0, 1) noise of the posterior sample ``μ + σ·ε``; None when the step
            takes the mode (``dit`` stage with ``vae_mode: mode``).
        mask_u: per sample (L_i,) U[0, 1) token-masking draws (stages ``vae`` and ``joint`` with ``L_mask``).
        mask_eps: per sample (n_i, d) N(0, 1) posterior noise of the masked copy.
    """

    posterior_eps: list[Tensor] | None
    mask_u: list[Tensor] | None
    mask_eps: list[Tensor] | None


class VaeResult(NamedTuple):
    """The VAE terms of a step and the posterior the flow term reads.

    Attributes:
        loss: () ``λ_VAE·(CE + β·regulariser + λ_mask·L_mask)``.
        metrics: ``recon_ce``, ``recon_acc``, ``kl`` (stage ``vae``) or ``neg_entropy`` (``joint``), ``mask_ce``.
        posterior: the rows' posterior, (Σn, d) moments.
        z: (Σn, d) its reparameterised sample, which the CE decoded.
    """

    loss: Tensor
    metrics: dict[str, float]
    posterior: Posterior
    z: Tensor


class VaeTerms:
    """The Text VAE's terms of ``cfg.stage`` on padded rows (see the module docstring).

    Its networks run :data:`~cdlm_cola.objective_flow.SAMPLES_PER_CALL` samples per call.

    Args:
        cfg: the Cola model section (stage, loss weights, ``mask_ratio``).
        vae: the Text VAE.
    """

    def __init__(self, cfg: ColaConfig, vae: ColaTextVAE) -> None:
        self.cfg, self.vae = cfg, vae
        self.masking = cfg.stage != "dit" and cfg.mask_weight > 0 and cfg.mask_ratio > 0

    def draw(self, lens: list[int], sampled: bool, generator: torch.Generator, device: torch.device) -> VaeDraws:
        """Draw the posterior noise (when ``sampled``), then the masking draws, of rows of ``lens`` tokens."""
        ps, d = self.vae.config.patch_size, self.vae.config.latent_dim
        posterior_eps = [draw_normal(generator, device, n // ps, d) for n in lens] if sampled else None
        mask_u = [draw_uniform(generator, device, n) for n in lens] if self.masking else None
        mask_eps = [draw_normal(generator, device, n // ps, d) for n in lens] if self.masking else None
        return VaeDraws(posterior_eps, mask_u, mask_eps)

    def __call__(self, rows: PaddedRows, draws: VaeDraws) -> VaeResult:
        """Reconstruct the rows (and their masked copies, with ``L_mask``) through a posterior sample."""
        cfg, ps = self.cfg, self.vae.config.patch_size
        assert draws.posterior_eps is not None
        ids, eps = list(rows.ids), list(draws.posterior_eps)
        masked: list[Tensor] = []
        if draws.mask_u is not None and draws.mask_eps is not None:
            pairs = [
                mask_tokens(r, v, u, cfg.mask_ratio, self.vae.config.vocab_size)
                for r, v, u in zip(ids, rows.valid, draws.mask_u, strict=True)
            ]
            ids += [corrupted for corrupted, _ in pairs]
            masked = [positions for _, positions in pairs]
            eps += draws.mask_eps
        post = self.posterior(ids)  # rows first, then their masked copies
        z_all = reparameterised(post, eps)  # (Σn, d)
        n_lens = [r.numel() // ps for r in ids]
        logits = self.decode(z_all, n_lens)  # (ΣL, V)
        targets = torch.cat(list(rows.ids) * (2 if masked else 1))  # masked copies predict the original tokens
        ce = F.cross_entropy(logits, targets, reduction="none")  # (ΣL,)
        n_tokens, n_latents = sum(r.numel() for r in rows.ids), sum(n_lens[: len(rows.ids)])
        valid = torch.cat(rows.valid).float()
        rows_post = Posterior(*(moment[:n_latents] for moment in post))
        latent_valid = torch.cat(rows.per_latent(ps)[0]).float()
        reg, regulariser = ("kl", kl_to_standard_normal) if cfg.stage == "vae" else ("neg_entropy", neg_entropy)
        terms = {  # each a mean over its own positions: tokens, latents or masked tokens
            "recon_ce": LossTerm(ce[:n_tokens], valid),
            "recon_acc": LossTerm((logits[:n_tokens].argmax(dim=-1) == targets[:n_tokens]).float(), valid),
            reg: LossTerm(regulariser(rows_post), latent_valid),
            "mask_ce": LossTerm(ce[n_tokens:], torch.cat(masked).float() if masked else ce.new_zeros(0)),
        }
        m = {name: term.mean() for name, term in terms.items()}
        loss = cfg.recon_weight * (m["recon_ce"] + cfg.kl_weight * m[reg] + cfg.mask_weight * m["mask_ce"])
        metrics = {name: float(mean.detach()) for name, mean in m.items()}
        return VaeResult(loss, metrics, rows_post, z_all[:n_latents])

    def posterior(self, ids: list[Tensor], vae: ColaTextVAE | None = None) -> Posterior:
        """Return the posterior, (Σn, d) moments, of rows (L_i,) encoded by ``vae`` (default: the trained one)."""
        params = self.encode(ids, vae).params
        assert params is not None  # use_variation, checked by require_posterior
        return posterior(torch.cat(params))

    def encode(self, ids: list[Tensor], vae: ColaTextVAE | None = None) -> VaeEncoding:
        """Encode rows (L_i,) with ``vae`` (default: the trained one), a few samples per call."""
        latents, params = [], []
        for group in sample_groups(len(ids), SAMPLES_PER_CALL):
            enc = (vae or self.vae).encode(ids[group])
            latents += enc.latents
            params += enc.params or []
        return VaeEncoding(latents, params or None)

    def decode(self, z: Tensor, n_lens: list[int]) -> Tensor:
        """Decode latents z (Σn_i, d) of samples with n_i latents each into fp32 logits (ΣL_i, V)."""
        parts = z.split(n_lens)
        groups = sample_groups(len(n_lens), SAMPLES_PER_CALL)
        return torch.cat([self.vae.decode(torch.cat(parts[g]), n_lens[g], n_lens[g]) for g in groups]).float()


class ColaVaeObjective(Objective):
    """Stage 1, ``model.stage: vae`` (spec §9.1): ``λ_VAE·(CE + β·KL(q ‖ N(0, I)) + λ_mask·L_mask)`` of the VAE.

    Rows are padded to the patch size only (there are no blocks without the DiT). Every random draw of a step is
    made by :meth:`draw` and held in :class:`VaeDraws`, so a step can be replayed through :meth:`loss`.

    Args:
        cfg: the Cola model section.
        vae: the Text VAE.

    Raises:
        RecipeError: the VAE has no Gaussian posterior.
    """

    def __init__(self, cfg: ColaConfig, vae: ColaTextVAE) -> None:
        require_posterior(cfg, vae)
        self.cfg, self.terms = cfg, VaeTerms(cfg, vae)

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Draw this step's random numbers from ``generator`` and compute the loss of ``batch``."""
        return self.loss(batch, self.draw(batch, generator))

    def draw(self, batch: TokenBatch, generator: torch.Generator) -> VaeDraws:
        """Draw the posterior noise, then the masking draws, of the rows of ``batch`` (``ids`` (B, L))."""
        B, L = batch.ids.shape
        ps = self.terms.vae.config.patch_size
        return self.terms.draw([L + (-L % ps)] * B, True, generator, batch.ids.device)

    def loss(self, batch: TokenBatch, draws: VaeDraws) -> LossOutput:
        """Compute the Stage-1 loss of ``batch`` for given draws; its terms are the metrics."""
        B, ps = batch.ids.shape[0], self.terms.vae.config.patch_size
        out = self.terms(PaddedRows.pad(batch, [ps] * B, self.cfg.pad_id), draws)
        return LossOutput(out.loss, out.metrics)
