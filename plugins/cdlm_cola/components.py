"""Cola's components behind the core interfaces: the VAE encoder, the DiT and the VAE decoder (Cola spec §2, §3, §6).

Generation runs one block of ``bs`` latents per row at a time (spec §6.1). A :class:`ColaCond` says where each
row's block sits in its sample: the history it attends to, held in the networks' KV caches (the reference's
way) or recomputed from its clean latents at every call (the uncached check), and the repainted prompt
positions. Latents everywhere are the DiT's scaled ones, ``(z − shift)·scale``; the decoder reads them as they
are, never inverse-transformed, exactly as the reference does (hazard H4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cdlm.interfaces import Denoiser, Discretizer, Embedder, TokenBatch
from cdlm_cola.dit import ColaDiT
from cdlm_cola.layout import BlockPlan
from cdlm_cola.schedule import ColaSchedule
from cdlm_cola.vae import ColaTextVAE, VaeEncoding, posterior_sample

CLEAN = 1.0
"""Core time of clean latents (Cola time 0): the history and the repainted prompt positions (spec §6.1)."""


@dataclass(frozen=True)
class ColaCond:
    """Where the current block of every row sits in its sample (spec §4.1, §5, §6.1).

    Attributes:
        cached: per row, the length of its history in the KV caches, which it reads (rows with a length map,
            in order, onto the cached samples), or None for a fresh sequence that reads no history.
        context: per row, (h_i, C) clean history latents recomputed at every call instead of read from a
            cache (the uncached path; then every ``cached`` entry is None), or None.
        pinned: (B, bs) bool, True on repainted prompt positions (first block only), or None.
        clean: (B, bs, C) the clean latents the pinned positions hold (other entries unused), or None.
    """

    cached: tuple[int | None, ...]
    context: tuple[Tensor, ...] | None = None
    pinned: Tensor | None = None
    clean: Tensor | None = None

    @classmethod
    def from_cache(cls, lengths: Sequence[int], pinned: Tensor | None = None, clean: Tensor | None = None) -> ColaCond:
        """Rows that continue the cached samples, whose histories hold ``lengths`` latents."""
        return cls(tuple(int(n) for n in lengths), None, pinned, clean)

    @classmethod
    def from_history(
        cls, history: Sequence[Tensor], pinned: Tensor | None = None, clean: Tensor | None = None
    ) -> ColaCond:
        """Rows whose clean histories (h_i, C) are recomputed at every call (no KV cache)."""
        return cls((None,) * len(history), tuple(history), pinned, clean)

    def __len__(self) -> int:
        return len(self.cached)

    def null(self) -> ColaCond:
        """Return the B unconditional rows: the same blocks with no history (spec §5 CFG, hazard H6).

        Each is a fresh sequence of one block, so its RoPE positions are 0..bs−1; repainted prompt positions
        stay in it (they are part of the block).
        """
        context = None if self.context is None else tuple(c[:0] for c in self.context)
        return ColaCond((None,) * len(self), context, self.pinned, self.clean)

    def with_null_rows(self) -> ColaCond:
        """Return 2B rows: these B conditional rows, then their B unconditional ones (:meth:`null`)."""
        null = self.null()
        context = None if self.context is None or null.context is None else self.context + null.context
        return ColaCond(self.cached + null.cached, context, _twice(self.pinned), _twice(self.clean))

    def restore(self, z: Tensor) -> Tensor:
        """Re-pin the repainted prompt positions of z (B, bs, C) to their clean latents (spec §6.1 step 7.2)."""
        if self.pinned is None or self.clean is None:
            return z
        return torch.where(self.pinned[..., None], self.clean.to(z.dtype), z)


def _twice(u: Tensor | None) -> Tensor | None:
    return None if u is None else torch.cat([u, u])


class ReferenceVAE(ColaTextVAE):
    """The frozen reference encoder ``q_φref`` of Stage 2 (spec §9.1): the VAE as it stands when joint training starts.

    Built as a copy of ``vae``; at its first :meth:`encode` it copies ``vae``'s weights again and sets the
    persistent ``synced`` flag. A Stage-2 run that starts from a Stage-1 checkpoint (``train.init_from``) thus
    anchors to the trained Stage-1 VAE, and a resumed run keeps the reference it saved. Stages that never
    encode with it (``vae``, ``dit``, sampling) only carry it, so every stage has the same checkpoint keys.

    Args:
        vae: the live VAE (not registered as a submodule).
    """

    def __init__(self, vae: ColaTextVAE) -> None:
        device = next(vae.parameters()).device
        with torch.device("meta"):
            super().__init__(vae.config)
        self.to_empty(device=device)
        self.register_buffer("synced", torch.zeros((), dtype=torch.bool, device=device))
        self._source = (vae,)  # a tuple: the live VAE must not become a submodule (its keys would repeat)
        self._copy()

    @torch.no_grad()
    def _copy(self) -> None:
        for mine, theirs in zip(self.parameters(), self._source[0].parameters(), strict=True):
            mine.copy_(theirs)

    def encode(self, ids: Sequence[Tensor]) -> VaeEncoding:
        """Encode like :meth:`ColaTextVAE.encode`, first taking the live VAE's weights if not yet synced."""
        if not bool(self.synced):
            self._copy()
            self.synced.fill_(True)
        return super().encode(ids)


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

        Repainted positions are evaluated as clean (Cola time 0); the history comes from the KV cache or is
        recomputed from ``cond.context``. ``self_cond`` is unused (Cola has no self-conditioning). ``plan``, from
        :meth:`plan` for these rows, takes the DiT's per-block fast path (same numbers to ≤ 1e-6).
        """
        rows, bs, _ = z.shape
        t_tok = t.float()[:, None].expand(rows, bs)  # (B, bs)
        if cond.pinned is not None:
            t_tok = torch.where(cond.pinned, CLEAN, t_tok)
        if cond.context is None:
            timestep = self.schedule.model_time(t_tok).flatten()  # (B·bs,)
            if plan is not None:
                return self.dit.step(z.flatten(0, 1), timestep, plan).unflatten(0, (rows, bs))
            k_lens, readers = self._lengths(cond, bs), [n is not None for n in cond.cached]
            out = self.dit(z.flatten(0, 1), k_lens, [bs] * rows, timestep, use_kv_cache=readers)  # (B·bs, C)
            return out.unflatten(0, (rows, bs))
        clean = [torch.full((c.shape[0],), CLEAN, device=z.device) for c in cond.context]
        txt, lens = _with_context(cond.context, z)
        timestep = self.schedule.model_time(torch.cat([u for pair in zip(clean, t_tok, strict=True) for u in pair]))
        return _tails(self.dit(txt, lens, lens, timestep), lens, bs)

    def plan(self, cond: ColaCond) -> BlockPlan | None:
        """Plan the DiT calls of one block for the rows of ``cond`` (:meth:`ColaDiT.plan`); make one per block.

        Returns:
            The plan, or None for rows whose history is recomputed at every call (``cond.context``).
        """
        if cond.context is not None:
            return None
        bs = self.dit.config.block_size
        readers = [n is not None for n in cond.cached]
        return self.dit.plan(self._lengths(cond, bs), [bs] * len(cond), use_kv_cache=readers)

    @staticmethod
    def _lengths(cond: ColaCond, bs: int) -> list[int]:
        """Keys per row of a cached-history call: its history (none for a fresh row) and its block."""
        return [(n or 0) + bs for n in cond.cached]

    def append(self, latents: Sequence[Tensor], cached: Sequence[int]) -> None:
        """Commit clean latents (n_i, C) per sample to the DiT's KV cache at Cola time 0 (spec §6.1 steps 6, 7.6).

        Keys and values come from a fresh forward at t = 0 (not from the last Euler step), as in the reference.

        Args:
            latents: per sample, the latents to append (n_i may be 0).
            cached: per sample, how many latents its cache already holds.
        """
        q_lens = [x.shape[0] for x in latents]
        txt = torch.cat(list(latents))  # (Σn, C)
        timestep = self.schedule.model_time(torch.full((txt.shape[0],), CLEAN, device=txt.device))
        k_lens = [c + q for c, q in zip(cached, q_lens, strict=True)]
        self.dit(txt, k_lens, q_lens, timestep, update_kv=True, use_kv_cache=True)


class ColaDecoder(Discretizer):
    """The VAE decoder on one block per row; token j is read from latent ⌊j / ps⌋ (spec §2.4).

    Args:
        vae: the text VAE (its decoder and decoder KV cache are used).
    """

    def __init__(self, vae: ColaTextVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor, cond: ColaCond) -> Tensor:
        """Return logits (B, bs·ps, V) for the scaled latents z (B, bs, C), fed as they are (H4).

        With cached histories the block is also committed to the decoder's cache, as the reference's
        block decode does (``update_kv=True``, spec §6.1 step 7.3); ``cond`` has no unconditional rows here.
        """
        rows, bs, _ = z.shape
        if cond.context is None:
            assert all(n is not None for n in cond.cached), "the decoder reads conditional rows only"
            k_lens = [(n or 0) + bs for n in cond.cached]
            logits = self.vae.decode(z.flatten(0, 1), k_lens, [bs] * rows, update_kv=True)  # (B·bs·ps, V)
            return logits.unflatten(0, (rows, -1))
        txt, lens = _with_context(cond.context, z)
        ps = self.vae.config.patch_size
        return _tails(self.vae.decode(txt, lens, lens), [n * ps for n in lens], bs * ps)

    def append(self, latents: Sequence[Tensor], cached: Sequence[int]) -> None:
        """Commit clean latents (n_i, C) per sample to the decoder's KV cache, discarding the logits (§6.1 step 6).

        Args:
            latents: per sample, the latents to append (n_i may be 0).
            cached: per sample, how many latents its cache already holds.
        """
        q_lens = [x.shape[0] for x in latents]
        k_lens = [c + q for c, q in zip(cached, q_lens, strict=True)]
        self.vae.decode(torch.cat(list(latents)), k_lens, q_lens, update_kv=True)


def _with_context(context: Sequence[Tensor], z: Tensor) -> tuple[Tensor, list[int]]:
    """Lay out ``[context_i ; z_i]`` per row in the NA layout: (Σ(h_i + bs), C) and the per-row lengths."""
    txt = torch.cat([u for pair in zip(context, z, strict=True) for u in pair])
    return txt, [c.shape[0] + z.shape[1] for c in context]


def _tails(out: Tensor, lens: Sequence[int], n: int) -> Tensor:
    """Return the last ``n`` rows of every sample of an NA-layout output (ΣL, …) as (B, n, …)."""
    return torch.stack([o[-n:] for o in out.split(list(lens))])
