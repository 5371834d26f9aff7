"""Block-wise flow matching of the Cola DiT in the 2L training layout (Cola spec §4.3, §5, §9).

Per sample the DiT sees ``[z_0 | noisy copy]`` (2n latents, positions ``[0..n−1, 0..n−1]``) under the 2L mask:
a noisy latent of block b attends to the clean blocks before b and to its own noisy block, which is the paper's
visible set ``V_b = {sg(z_0^(<b)), z_t^(b)}`` for every block at once. The flow term is the core's
:class:`~cdlm.objective.LossTerm`: per noisy latent, the squared error of the output against Cola's velocity
``z_1 − z_0``, counted on the trained latents (its mean is normalised by ``max(Σ loss_mask, 1)``).

Each latent of the noisy copy is in one of three states, decided per block before any noise is applied:

* :data:`NOISY`: ``z_t`` at the sample's time, trained;
* :data:`CLEAN`: ``z_0`` at time "data" (DiT timestep 0), not trained: a prompt prefix inside a block, the
  conditioning the first generated block sees at inference (repaint);
* :data:`HIDDEN`: ``z_1`` (pure noise) at the sample's time, not trained: a prompt latent that follows a response
  latent in its block (SFT), replaced so that the response cannot read it.

The layout keeps Cola's time τ (1 = noise, the convention of the DiT and of the scripts) and reads the path in τ
from :class:`~cdlm_cola.schedule.ColaSchedule`: ``z_t = (1 − τ)·z_0 + τ·z_1``, DiT timestep ``time_scale·τ``,
target ``z_1 − z_0``. Its callers get τ as drawn, in Cola time, from
:meth:`~cdlm_cola.schedule.ColaSchedule.sample_tau`. Going through core time instead would compute
``1 − (1 − τ)``, which drops the low bits of every τ < 0.5 (up to 3e-8, i.e. 3e-5 on the DiT's 0..1000
timestep): the noisy latents and the DiT input would no longer be the scripts' at the same draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cdlm.objective import LossTerm
from cdlm_cola import layout
from cdlm_cola.dit import ColaDiT
from cdlm_cola.schedule import ColaSchedule

CLEAN, NOISY, HIDDEN = 0, 1, 2
"""States of a noisy-copy latent (see the module docstring)."""

SAMPLES_PER_CALL = 4
"""Samples per VAE call, and per DiT call when lengths differ: NA attention is dense over a call's samples, so
small groups keep a step linear in the batch size (same numbers as one call; see :func:`sample_groups`). DiT
samples of equal length run as one batch instead (:meth:`TwoLayout.run`)."""


def role_states(
    cond: Tensor, block_size: int, loss_mode: Literal["all_token", "sft"], boundary_mode: Literal["token", "block"]
) -> Tensor:
    """Return the state of every latent of one sample from its prompt/response roles (spec §9.2, ``cola_sft.py``).

    A response latent is always NOISY. A prompt latent is HIDDEN when a response latent precedes it in its block
    (``boundary_mode="token"``) or when its block starts with a response and holds both roles (``"block"``);
    otherwise it is CLEAN under ``loss_mode="sft"`` and NOISY under ``"all_token"``. Without prompt latents
    every latent is NOISY (pretraining).

    Args:
        cond: (n,) bool, True on prompt (condition) latents; n a multiple of ``block_size``.
        block_size: latents per block of this sample.
        loss_mode: whether prompt latents before any response are trained.
        boundary_mode: per-latent (``token``) or per-block (``block``) leakage rule.

    Returns:
        (n,) int64 states.
    """
    prompt = cond.view(-1, block_size)  # (nb, bs)
    response = ~prompt
    if boundary_mode == "token":
        after_response = response.cumsum(dim=1) > 0  # (nb, bs) a response at or before this latent
        hidden = prompt & after_response
    else:
        local = torch.arange(block_size, device=cond.device).expand_as(prompt)  # (nb, bs)
        first_response = torch.where(response, local, block_size).min(dim=1).values  # (nb,)
        first_prompt = torch.where(prompt, local, block_size).min(dim=1).values  # (nb,)
        mixed = prompt.any(dim=1) & response.any(dim=1)
        hidden = prompt & (mixed & (first_response < first_prompt))[:, None]
    clean = prompt & ~hidden if loss_mode == "sft" else torch.zeros_like(prompt)
    states = torch.full_like(prompt, NOISY, dtype=torch.long)
    states = states.masked_fill(hidden, HIDDEN).masked_fill(clean, CLEAN)
    return states.flatten()  # (n,)


def with_prompt_blocks(states: Tensor, block_size: int, use: Tensor, split: Tensor, prob: float) -> Tensor:
    """Turn random block prefixes into clean prompts (spec §9.2 ``prompt_block_prob``, ``cola_pretrain.py``).

    Block b (of at least 2 latents) becomes a prompt block when ``use[b] < prob``: its first ``split[b]`` latents
    are CLEAN, the rest keep their state.

    Args:
        states: (n,) int64 states; n a multiple of ``block_size``.
        block_size: latents per block.
        use: (n / block_size,) U[0, 1) draws.
        split: (n / block_size,) int64 clean-prefix lengths in ``[1, block_size − 1]``.
        prob: probability of a prompt block.

    Returns:
        (n,) int64 states.
    """
    if block_size < 2:
        return states
    local = torch.arange(block_size, device=states.device)  # (bs,)
    prefix = (use < prob)[:, None] & (local[None, :] < split[:, None])  # (nb, bs)
    return states.masked_fill(prefix.flatten(), CLEAN)


def sample_groups(n_samples: int, size: int | None) -> list[slice]:
    """Split ``n_samples`` consecutive samples into groups of at most ``size`` (one group when None).

    An NA call attends densely over all its samples, so its cost grows with the square of its total length;
    samples never see each other, so calling the networks group by group gives the same numbers for less work.
    """
    step = size or max(n_samples, 1)
    return [slice(start, start + step) for start in range(0, n_samples, step)]


@dataclass(frozen=True)
class TwoLayout:
    """The DiT input of a flow-matching step and what its output is compared with (spec §4.3).

    Attributes:
        txt: (Σ2n, C) per sample ``[z_0 (detached) | noisy copy]``.
        timestep: (Σ2n,) DiT timesteps, 0..time_scale; 0 on the clean half and on CLEAN latents.
        positions: (Σ2n,) int64 RoPE positions ``[0..n−1, 0..n−1]`` per sample, for keys and queries alike.
        seq_lens: n per sample.
        block_sizes: the block size of each sample's 2L mask.
        target: (Σn, C) Cola velocity ``z_1 − z_0`` of the noisy halves.
        loss_mask: (Σn,) fp32, 1 on NOISY latents marked trainable (by default not padding; spec §9.2).
    """

    txt: Tensor
    timestep: Tensor
    positions: Tensor
    seq_lens: list[int]
    block_sizes: list[int]
    target: Tensor
    loss_mask: Tensor

    def mask(self, group: slice = slice(None)) -> Tensor:
        """Return the additive 2L block-causal mask (1, 1, Σ2n, Σ2n) of the samples in ``group``."""
        return layout.twol_block_causal_mask(
            self.seq_lens[group], self.block_sizes[group], self.txt.dtype, self.txt.device
        )

    def run(self, dit: ColaDiT, samples_per_call: int | None = None) -> Tensor:
        """Call the DiT on the layout: samples of equal length as one batch, else ``samples_per_call`` at a time.

        Equal lengths (fixed-length training rows) take one call with a per-sample mask, (1, 1, 2n, 2n), or
        (B, 1, 2n, 2n) when block sizes differ: the samples attend as a batch, linear in B. Otherwise samples go
        in NA groups (all at once when ``samples_per_call`` is None), whose mask is quadratic in a group's length.

        Returns:
            (Σ2n, C) the DiT output of every latent of both halves.
        """
        lens = [2 * n for n in self.seq_lens]
        if len(set(lens)) == 1:
            sizes = sorted(set(self.block_sizes))
            if len(sizes) == 1:
                mask = layout.twol_block_causal_mask(self.seq_lens[:1], sizes, self.txt.dtype, self.txt.device)
            else:
                mask = torch.cat([self.mask(slice(i, i + 1)) for i in range(len(lens))])  # (B, 1, 2n, 2n)
            pos = self.positions
            return dit(self.txt, lens, lens, self.timestep, k_positions=pos, q_positions=pos, mask=mask)
        bounds = torch.tensor([0, *lens]).cumsum(0).tolist()
        out = []
        for group in sample_groups(len(lens), samples_per_call):
            rows = slice(bounds[group.start], bounds[min(group.stop, len(lens))])
            pos, glens = self.positions[rows], lens[group]
            out.append(
                dit(
                    self.txt[rows],
                    glens,
                    glens,
                    self.timestep[rows],
                    k_positions=pos,
                    q_positions=pos,
                    mask=self.mask(group),
                )
            )
        return torch.cat(out)  # (Σ2n, C)

    def term(self, out: Tensor) -> LossTerm:
        """Return the flow term of a DiT output (Σ2n, C): the noisy half's fp32 squared error (Σn,) (spec §5)."""
        noisy = torch.cat([torch.arange(2 * n, device=out.device) >= n for n in self.seq_lens])  # (Σ2n,)
        pred = out[noisy].float()  # (Σn, C)
        return LossTerm((pred - self.target.float()).pow(2).mean(dim=-1), self.loss_mask)  # (Σn,)


def two_layout(
    z0: Tensor,
    z1: Tensor,
    tau: Tensor,
    states: Tensor,
    trained: Tensor,
    seq_lens: Sequence[int],
    block_sizes: Sequence[int],
    schedule: ColaSchedule,
) -> TwoLayout:
    """Build the 2L layout of a batch: the noisy copies, the DiT inputs and the loss targets (spec §4.3, §9).

    Gradients flow into ``z0`` through the noisy copy and the target; the clean half is ``z0.detach()``, the
    stop-gradient history ``sg(z_0^(<b))`` of the paper's Stage 2 (spec §9.1).

    Args:
        z0: (Σn, C) the samples' clean latents, already ``(z − shift)·scale``, sample after sample.
        z1: (Σn, C) standard-normal noise of the same latents.
        tau: (B,) Cola times τ (1 noise, 0 data), one per sample.
        states: (Σn,) int64 latent states (:data:`CLEAN`, :data:`NOISY`, :data:`HIDDEN`).
        trained: (Σn,) bool, False on latents kept out of the loss: padding, unless the objective trains it
            (``padding_loss: trained``, ``cola_cpt.py``'s all-ones loss mask).
        seq_lens: n per sample.
        block_sizes: per-sample block size of the 2L mask.
        schedule: Cola's path in τ: the noisy copy, the DiT's timestep and the target (spec §5).

    Returns:
        The layout; call :meth:`TwoLayout.run` then :meth:`TwoLayout.term`.
    """
    device = z0.device
    tau_row = tau.to(device).repeat_interleave(torch.tensor(list(seq_lens), device=device))  # (Σn,)
    tau_row = torch.where(states == CLEAN, torch.zeros_like(tau_row), tau_row)  # CLEAN latents sit at the data end
    noisy = schedule.interpolate_tau(z0, z1, tau_row)  # (Σn, C); exactly z_0 where τ = 0
    noisy = torch.where((states == HIDDEN)[:, None], z1, noisy)

    def interleave(clean: Tensor, noisy: Tensor) -> Tensor:  # per sample [clean_i | noisy_i]
        pairs = zip(clean.split(list(seq_lens)), noisy.split(list(seq_lens)), strict=True)
        return torch.cat([part for pair in pairs for part in pair])

    return TwoLayout(
        txt=interleave(z0.detach(), noisy),  # (Σ2n, C)
        timestep=interleave(torch.zeros_like(tau_row), schedule.dit_time(tau_row)),  # (Σ2n,)
        positions=layout.twol_positions(list(seq_lens), device),  # (Σ2n,)
        seq_lens=list(seq_lens),
        block_sizes=list(block_sizes),
        target=schedule.target(z0, z1),  # (Σn, C)
        loss_mask=((states == NOISY) & trained.to(device)).float(),  # (Σn,)
    )
