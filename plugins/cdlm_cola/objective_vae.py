"""The Text VAE's training terms (Cola spec §9.1): posterior regularisers and BERT-style token masking.

The paper's Stage 1/2 code is not public; these are its stated terms, per latent (summed over the d channels),
for the diagonal Gaussian posterior ``q(z | x) = N(μ, σ²)`` of :func:`cdlm_cola.vae.posterior` (log-variance
clamped to [−30, 20] as the reference does):

* ``KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²)``, Stage 1's β term with ``p_base = N(0, I)``;
* ``E_q log q = −½ Σ (log 2π + 1 + log σ²)``, Stage 2's β term (the negative entropy: the prior's role passes
  to the DiT through ``L_FM``);
* ``KL(q ‖ q_ref) = ½ Σ (log σ_ref² − log σ² + (σ² + (μ − μ_ref)²) / σ_ref² − 1)``, Stage 2's anchor to the
  frozen reference encoder.
"""

from __future__ import annotations

import math

from torch import Tensor

from cdlm_cola.vae import Posterior

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


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Return the mean () of ``values`` (N,) over ``mask`` (N,) bool, 0 when the mask is empty."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)
