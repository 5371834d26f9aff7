"""Cola's components behind the core interfaces: the VAE encoder, the DiT and the VAE decoder (Cola spec §2, §3, §6).

Generation runs one block of ``bs`` latents per row at a time (spec §6.1). A :class:`ColaCond` says where each
row's block sits in its sample: the history it reads and the repainted prompt positions. The history is a
:class:`ColaGenerationState`, which generation creates per batch and every cond carries: the two networks' KV
caches, extended only by its explicit commits. No module holds any of it, so the networks' forwards have no
side effects and generations that share a model may interleave. Latents everywhere are the DiT's scaled ones,
``(z − shift)·scale``; the decoder reads them as they are, never inverse-transformed, exactly as the reference
does (hazard H4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor

from cdlm.interfaces import Denoiser, Discretizer, Embedder, TokenBatch
from cdlm_cola.dit import ColaDiT
from cdlm_cola.kv_cache import KVCache
from cdlm_cola.layout import BlockPlan, HeadTable
from cdlm_cola.schedule import ColaSchedule
from cdlm_cola.vae import ColaTextVAE, posterior_sample

DATA_TIME = 1.0
"""Core time of clean latents (Cola time 0): the history and the repainted prompt positions (spec §6.1)."""


@dataclass(frozen=True)
class ColaCond:
    """Where the current block of every row sits in its sample (spec §4.1, §5, §6.1).

    Attributes:
        cached: per row, the length of its history, which it reads from ``state`` (rows with a length map, in
            order, onto the state's samples), or None for a fresh sequence that reads no history.
        state: the generation state holding the history, or None when there is none.
        pinned: (B, bs) bool, True on repainted prompt positions (first block only), or None.
        clean: (B, bs, C) the clean latents the pinned positions hold (other entries unused), or None.
    """

    cached: tuple[int | None, ...]
    state: ColaGenerationState | None = None
    pinned: Tensor | None = None
    clean: Tensor | None = None

    def __len__(self) -> int:
        return len(self.cached)

    @cached_property
    def block_plan(self) -> BlockPlan:
        """The DiT's plan of these rows' calls (:meth:`ColaDenoiser.plan`), made at first use, then kept.

        A plan holds the history as it was, so a cond is made per block (and its 2B rows per block, by
        :meth:`with_null_rows`); every Euler step of the block reuses it.
        """
        assert self.state is not None, "rows without a generation state have no cache to plan against"
        return self.state.denoiser.plan(self)

    def null(self) -> ColaCond:
        """Return the B unconditional rows: the same blocks with no history (spec §5 CFG, hazard H6).

        Each is a fresh sequence of one block, so its RoPE positions are 0..bs−1; repainted prompt positions
        stay in it (they are part of the block).
        """
        return replace(self, cached=(None,) * len(self))

    def with_null_rows(self) -> ColaCond:
        """Return 2B rows: these B conditional rows, then their B unconditional ones (:meth:`null`)."""
        return replace(
            self, cached=self.cached + self.null().cached, pinned=_twice(self.pinned), clean=_twice(self.clean)
        )

    def restore(self, z: Tensor) -> Tensor:
        """Re-pin the repainted prompt positions of z (B, bs, C) to their clean latents (spec §6.1 step 7.2)."""
        if self.pinned is None or self.clean is None:
            return z
        return torch.where(self.pinned[..., None], self.clean.to(z.dtype), z)


def _twice(u: Tensor | None) -> Tensor | None:
    return None if u is None else torch.cat([u, u])


class ColaGenerationState:
    """One batch's generation state (spec §6.1): its history in the DiT's and the VAE decoder's KV caches.

    Generation creates one per batch and hands it to the networks explicitly, in every cond it makes
    (:meth:`cond`); only :meth:`decode` and :meth:`commit` extend the caches, and :meth:`record` the token ids.
    Between the two the decoder's cache is one block ahead of the DiT's.

    Args:
        denoiser: the DiT, whose cache this holds.
        decoder: the VAE decoder, whose cache this holds.
        prefix: per sample, its clean history latents (n_i, C) (n_i may be 0), committed to both caches at
            Cola time 0: the prefill (spec §6.1 step 6).

    Attributes:
        lengths: per sample, the history latents in the DiT's cache.
        dit: the DiT's cache, or None while it holds nothing.
        vae: the VAE decoder's cache, or None while it holds nothing.
        heads: the DiT's timestep table, shared by the plans of every block.
        ids: (B, P) the token ids selected so far (the repetition penalty's history), or None before any.
    """

    def __init__(self, denoiser: ColaDenoiser, decoder: ColaDecoder, prefix: Sequence[Tensor]) -> None:
        self.denoiser, self.decoder = denoiser, decoder
        self.lengths = [p.shape[0] for p in prefix]
        self.dit: KVCache | None = None
        self.vae: KVCache | None = None
        self.heads: HeadTable = {}
        self.ids: Tensor | None = None
        if any(self.lengths):
            self.dit, self.vae = denoiser.append(prefix), decoder.append(prefix)

    def cond(self, pinned: Tensor | None = None, clean: Tensor | None = None) -> ColaCond:
        """Return the next block's rows, one per sample, reading this history; ``pinned``, ``clean`` as in ColaCond."""
        return ColaCond(tuple(self.lengths), self, pinned, clean)

    def decode(self, z: Tensor) -> Tensor:
        """Return the logits (B, bs·ps, V) of the block z (B, bs, C), committing it to the decoder cache (§6.1 7.3)."""
        logits, self.vae = self.decoder.commit(z, self.cond())
        return logits

    def commit(self, z: Tensor) -> int:
        """Commit the block's final latents z (B, bs, C) to the DiT's cache at Cola time 0 (spec §6.1 step 7.6).

        Returns:
            The network evaluations spent: 1.
        """
        self.dit = self.denoiser.append(list(z), self.dit)
        self.lengths = [n + z.shape[1] for n in self.lengths]
        return 1

    def record(self, ids: Tensor) -> None:
        """Append a block's selected token ids (B, bs·ps) to :attr:`ids`."""
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=1)


class ReferenceVAE(ColaTextVAE):
    """The frozen reference encoder ``q_φref`` of Stage 2 (spec §9.1): the VAE as it stood when joint training started.

    Built as a copy of ``vae``, so that every stage saves the same keys. :meth:`anchor` takes the VAE's weights
    again, once: the joint objective calls it before its first loss, after the core has loaded any
    ``train.init_from`` weights and resumed any checkpoint, so a Stage-2 run started from a Stage-1 checkpoint
    anchors to the trained Stage-1 VAE. The persistent ``synced`` flag records it, so a resumed run keeps the
    reference it saved. Stages that never encode with it (``vae``, ``dit``, sampling) only carry it.

    Args:
        vae: the VAE to copy (not kept).
    """

    def __init__(self, vae: ColaTextVAE) -> None:
        device = next(vae.parameters()).device
        with torch.device("meta"):
            super().__init__(vae.config)
        self.to_empty(device=device)
        self.register_buffer("synced", torch.zeros((), dtype=torch.bool, device=device))
        self._copy(vae)

    @torch.no_grad()
    def anchor(self, vae: ColaTextVAE) -> None:
        """Take ``vae``'s weights and set ``synced``, unless this reference has anchored already."""
        if not bool(self.synced):
            self._copy(vae)
            self.synced.fill_(True)

    @torch.no_grad()
    def _copy(self, vae: ColaTextVAE) -> None:
        for mine, theirs in zip(self.parameters(), vae.parameters(), strict=True):
            mine.copy_(theirs)


class ColaEmbedder(Embedder):
    """The VAE encoder, giving the DiT's latents ``(z − shifting_factor)·scaling_factor`` (spec §5, §6.1 step 3).

    Args:
        vae: the text VAE (its encoder is used; it is not copied).
    """

    def __init__(self, vae: ColaTextVAE) -> None:
        super().__init__()
        self.vae = vae

    def encode(self, ids: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
        """Encode token rows into scaled latents, one tensor per row.

        Args:
            ids: (L_i,) int64 per row; each L_i a positive multiple of the VAE ``patch_size``.
            generator: None takes the posterior mode (inference); otherwise a posterior sample drawn from it.

        Returns:
            (L_i / ps, C) fp32 latents per row.
        """
        cfg = self.vae.config
        enc = self.vae.encode(ids)
        if generator is None or enc.params is None:
            latents = enc.latents
        else:
            latents = [posterior_sample(p, generator) for p in enc.params]
        return [((z - cfg.shifting_factor) * cfg.scaling_factor).float() for z in latents]

    def forward(self, batch: TokenBatch, generator: torch.Generator | None = None) -> Tensor:
        """Return the scaled latents (B, L / ps, C) of the rows of ``batch``, each row encoded as one sample.

        Padding is encoded like any token, as the reference does with its padded rows. ``generator`` as in
        :meth:`encode`.
        """
        return torch.stack(self.encode(list(batch.ids), generator))


class ColaDenoiser(Denoiser):
    """The DiT on one block per row, in core time (the conversion is :class:`ColaSchedule`'s).

    Args:
        dit: the block-causal DiT.
        schedule: gives the DiT's timestep input for a core time.
    """

    def __init__(self, dit: ColaDiT, schedule: ColaSchedule) -> None:
        super().__init__()
        self.dit = dit
        self.schedule = schedule

    def forward(
        self, z: Tensor, t: Tensor, cond: ColaCond, self_cond: Tensor | None = None, *, plan: BlockPlan | None = None
    ) -> Tensor:
        """Return the raw DiT output (B, bs, C), Cola's velocity, for blocks z (B, bs, C) at core times t (B,).

        Repainted positions are evaluated as clean (Cola time 0); the history is read from the DiT cache of
        ``cond.state``. ``self_cond`` is unused (Cola has no self-conditioning). ``plan``, from :meth:`plan` for
        these rows, takes the DiT's per-block fast path (same numbers to ≤ 1e-6).
        """
        rows, bs, _ = z.shape
        t_tok = t.float()[:, None].expand(rows, bs)  # (B, bs)
        if cond.pinned is not None:
            t_tok = torch.where(cond.pinned, DATA_TIME, t_tok)
        timestep = self.schedule.model_time(t_tok).flatten()  # (B·bs,)
        if plan is not None:
            return self.dit.step(z.flatten(0, 1), timestep, plan).unflatten(0, (rows, bs))
        cache = None if cond.state is None else cond.state.dit
        readers = [n is not None for n in cond.cached]
        out = self.dit(z.flatten(0, 1), _k_lens(cond, bs), [bs] * rows, timestep, cache=cache, readers=readers)
        return out.unflatten(0, (rows, bs))  # (B, bs, C)

    def plan(self, cond: ColaCond) -> BlockPlan:
        """Plan the DiT calls of one block for the rows of ``cond`` (:meth:`ColaDiT.plan`); make one per block."""
        bs, state = self.dit.config.block_size, cond.state
        return self.dit.plan(
            _k_lens(cond, bs),
            [bs] * len(cond),
            cache=None if state is None else state.dit,
            readers=[n is not None for n in cond.cached],
            heads=None if state is None else state.heads,
        )

    def append(self, latents: Sequence[Tensor], cache: KVCache | None = None) -> KVCache:
        """Return ``cache`` with clean latents committed at Cola time 0 (spec §6.1 steps 6, 7.6).

        Keys and values come from a fresh forward at t = 0 (not from the last Euler step), as in the reference.

        Args:
            latents: per sample, the latents (n_i, C) to append (n_i may be 0).
            cache: the DiT's cache of these samples, or None before the first commit.
        """
        txt = torch.cat(list(latents))  # (Σn, C)
        timestep = self.schedule.model_time(torch.full((txt.shape[0],), DATA_TIME, device=txt.device))
        return self.dit.commit(txt, *_commit_lengths(latents, cache), timestep, cache)[1]


class ColaDecoder(Discretizer):
    """The VAE decoder on one block per row; token j is read from latent ⌊j / ps⌋ (spec §2.4).

    Args:
        vae: the text VAE (its decoder is used).
    """

    def __init__(self, vae: ColaTextVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor, cond: ColaCond) -> Tensor:
        """Return logits (B, bs·ps, V) for the scaled latents z (B, bs, C), fed as they are (H4).

        The history is read from the decoder cache of ``cond.state``; ``cond`` has no unconditional rows here.
        """
        cache = None if cond.state is None else cond.state.vae
        return self.vae.decode(z.flatten(0, 1), *_block_lengths(z, cond), cache=cache).unflatten(0, (z.shape[0], -1))

    def commit(self, z: Tensor, cond: ColaCond) -> tuple[Tensor, KVCache]:
        """Decode as :meth:`forward` does and also return the decoder cache with the block appended.

        The reference's block decode (``update_kv=True``, spec §6.1 step 7.3); ``cond.state`` is left as it is.
        """
        cache = None if cond.state is None else cond.state.vae
        logits, extended = self.vae.decode_commit(z.flatten(0, 1), *_block_lengths(z, cond), cache)  # (B·bs·ps, V)
        return logits.unflatten(0, (z.shape[0], -1)), extended

    def append(self, latents: Sequence[Tensor], cache: KVCache | None = None) -> KVCache:
        """Return ``cache`` with clean latents committed, discarding the logits (the prefill, spec §6.1 step 6).

        Args:
            latents: per sample, the latents (n_i, C) to append (n_i may be 0).
            cache: the decoder's cache of these samples, or None before the first commit.
        """
        return self.vae.decode_commit(torch.cat(list(latents)), *_commit_lengths(latents, cache), cache)[1]


def _k_lens(cond: ColaCond, bs: int) -> list[int]:
    """Keys per row of a block call: its history (none for a fresh row) and its block."""
    return [(n or 0) + bs for n in cond.cached]


def _block_lengths(z: Tensor, cond: ColaCond) -> tuple[list[int], list[int]]:
    """Return the key and query lengths of a decoder call on the blocks z (B, bs, C) of conditional rows."""
    assert all(n is not None for n in cond.cached), "the decoder reads conditional rows only"
    rows, bs, _ = z.shape
    return _k_lens(cond, bs), [bs] * rows


def _commit_lengths(latents: Sequence[Tensor], cache: KVCache | None) -> tuple[list[int], list[int]]:
    """Return the key and query lengths of a commit of ``latents`` (n_i, C) per sample after ``cache``."""
    q_lens = [x.shape[0] for x in latents]
    cached = (cache.lengths if cache is not None else []) or [0] * len(q_lens)
    return [c + q for c, q in zip(cached, q_lens, strict=True)], q_lens
