"""The Cola block-causal DiT prior over latents in the NA layout (Cola spec §3). No loss, no sampling loop.

Cola's own time convention holds here: t = 1 is noise, the timestep input is on the 0..1000 scale, and the
output is the velocity ``z_1 − z_0`` (spec §5); :mod:`cdlm_cola.schedule` converts to core time. Module and
parameter names are the official ``ColaDiTModel`` ones (spec §3.1); the deterministic ``rope.freqs`` buffers
are not module state (RoPE is computed from positions, H1) and :mod:`cdlm_cola.state_dict` handles them.
:meth:`ColaDiT.forward` works as the reference, per call; :meth:`ColaDiT.plan` and :meth:`ColaDiT.step` are
the generation fast path, which does the work that the Euler steps of a block share once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdlm.errors import DataError
from cdlm_cola import layout
from cdlm_cola.config import ColaDitConfig
from cdlm_cola.kv_cache import BlockKV, KVCache
from cdlm_cola.layout import BlockAttention, BlockPlan, Lengths, NaAttention
from cdlm_cola.rope import Rotary

SINUSOIDAL_DIM = 256  # width of the sinusoidal timestep features, fixed in the reference
ROPE_THETA = 10000.0
Attention = NaAttention | BlockAttention  # per call (the reference's way) or per block (the fast path)
LayerKV = KVCache | BlockKV | None  # a layer's cache, its per-block history, or nothing to read


def sinusoidal_embedding(t: Tensor, dim: int = SINUSOIDAL_DIM) -> Tensor:
    """Return ``[sin(t·f) | cos(t·f)]`` (N, dim) fp32 with ``f_k = exp(−ln(1e4)·k/(dim/2))`` (spec §3.2 step 3).

    Args:
        t: (N,) timesteps on the 0..1000 scale.
        dim: even feature width.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (N, dim)


class _Projection(nn.Module):
    """A single ``proj`` Linear: the reference's PatchIn1D / PatchOut1D at patch size 1."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)


class TimestepEmbedding(nn.Module):
    """Sinusoid(256) → Linear → SiLU → Linear → SiLU → Linear."""

    def __init__(self, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(SINUSOIDAL_DIM, hidden_dim)
        self.proj_hid = nn.Linear(hidden_dim, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, output_dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """Embed t (N,) into (N, emb_dim); the sinusoid is fp32, then cast to the trunk's dtype (spec §12)."""
        h = F.silu(self.proj_in(sinusoidal_embedding(t).to(dtype)))
        return self.proj_out(F.silu(self.proj_hid(h)))


@dataclass(frozen=True)
class TokenEmbedding:
    """The timestep embeddings of a call's query rows: one per row, or one per distinct timestep and an index.

    Every AdaLN head is a row-wise Linear, so it may run on the distinct embeddings and be spread to the rows
    afterwards: within a generation block the rows share one noisy timestep (and t = 0 on repainted positions).

    Attributes:
        emb: (N, E) embeddings: N = ΣLq, one per row, or one per distinct timestep.
        index: (ΣLq,) int64, the row of ``emb`` of every query row; None when ``emb`` has one per row.
    """

    emb: Tensor
    index: Tensor | None = None

    def spread(self, x: Tensor) -> Tensor:
        """Give x (N, …), computed row-wise from ``emb``, to every query row: (ΣLq, …), or (1, …) to broadcast."""
        if self.index is None or x.shape[0] == 1:
            return x
        return x[self.index]


class AdaLN(nn.Module):
    """Adaptive LayerNorm heads: ``{layer}_in`` gives [shift, scale], ``{layer}_out`` a residual gate.

    Args:
        dim: trunk width (the embedding must have it too).
        layers: names of the modulated sub-layers (``msa``, ``mlp`` or ``out``).
        gated: whether each layer also has an ``_out`` gate.
    """

    def __init__(self, dim: int, layers: tuple[str, ...], gated: bool) -> None:
        super().__init__()
        for name in layers:
            self.add_module(f"{name}_in", nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)))
            if gated:
                self.add_module(f"{name}_out", nn.Sequential(nn.SiLU(), nn.Linear(dim, dim)))

    def modulate(self, name: str, h: Tensor, norm: nn.Module, emb: TokenEmbedding) -> Tensor:
        """Return ``norm(h)·(1 + scale) + shift`` (L, H); shift is the first half."""
        shift, scale = emb.spread(getattr(self, f"{name}_in")(emb.emb)).chunk(2, dim=-1)
        return norm(h) * (1 + scale) + shift

    def gate(self, name: str, h: Tensor, residual: Tensor, emb: TokenEmbedding) -> Tensor:
        """Return ``h·gate + residual`` (L, H)."""
        return h * emb.spread(getattr(self, f"{name}_out")(emb.emb)) + residual


class ColaDiTAttention(nn.Module):
    """Self-attention with per-head qk LayerNorm and partial interleaved RoPE (spec §3.3)."""

    def __init__(self, cfg: ColaDitConfig) -> None:
        super().__init__()
        inner = cfg.heads * cfg.head_dim
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.proj_qkv = nn.Linear(cfg.txt_dim, 3 * inner, bias=cfg.qk_bias)  # rows [q | k | v], heads contiguous
        self.proj_out = nn.Linear(inner, cfg.txt_dim, bias=cfg.qk_bias)
        self.norm_q = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)  # one LayerNorm shared by all heads (H3)
        self.norm_k = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)

    def forward(self, x: Tensor, na: Attention, cache: LayerKV) -> Tensor:
        """Map x (ΣLq, H) to (ΣLq, H); ``cache`` holds values and keys after norm_k, before RoPE (a BlockKV: after)."""
        q, k, v = self.proj_qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(1)  # (ΣLq, nh, hd) each
        q, k = self.norm_q(q), self.norm_k(k)
        k, v = na.history(cache, k, v)  # (ΣLk, nh, hd)
        return self.proj_out(na.attend(q, k, v))


class MLP(nn.Module):
    """Linear → GELU (tanh approximation) → Linear; not SwiGLU (spec §14)."""

    def __init__(self, dim: int, expand_ratio: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * expand_ratio)
        self.proj_out = nn.Linear(dim * expand_ratio, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map (L, H) to (L, H)."""
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class ColaDiTBlock(nn.Module):
    """AdaLN-modulated attention and MLP with gated residuals (spec §3.2 step 5)."""

    def __init__(self, cfg: ColaDitConfig) -> None:
        super().__init__()
        self.msa_norm = nn.LayerNorm(cfg.txt_dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.msa = ColaDiTAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.txt_dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.mlp = MLP(cfg.txt_dim, cfg.expand_ratio)
        self.ada = AdaLN(cfg.txt_dim, ("msa", "mlp"), gated=True)

    def forward(self, h: Tensor, emb: TokenEmbedding, na: Attention, cache: LayerKV) -> Tensor:
        """Map h (ΣLq, H) under the rows' timestep embeddings to (ΣLq, H)."""
        a = self.msa(self.ada.modulate("msa", h, self.msa_norm, emb), na, cache)
        h = self.ada.gate("msa", a, h, emb)
        m = self.mlp(self.ada.modulate("mlp", h, self.mlp_norm, emb))
        return self.ada.gate("mlp", m, h, emb)


def per_token_timesteps(
    timestep: Tensor | float, q_lens: list[int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Broadcast a timestep to one per query row (spec §3.2 step 2).

    Args:
        timestep: a number or 0-d/(1,) tensor (all rows), (ΣLq,) per row, or (B,) per sample (repeated by
            ``q_lens``). When B = ΣLq the per-row reading wins, as in the reference.
        q_lens: queries per sample.
        dtype: dtype given to a Python number (the trunk's dtype, as in the reference).
        device: where the rows live.

    Returns:
        (ΣLq,) timesteps on the 0..1000 scale.

    Raises:
        DataError: the timestep has neither 1, ΣLq nor B entries.
    """
    t = torch.as_tensor(timestep, dtype=None if isinstance(timestep, Tensor) else dtype, device=device).reshape(-1)
    n_rows = sum(q_lens)
    if t.numel() == 1:
        return t.expand(n_rows)
    if t.numel() == n_rows:
        return t
    if t.numel() == len(q_lens):
        return t.repeat_interleave(torch.tensor(q_lens, device=device))
    raise DataError(f"timestep: expected 1, {n_rows} (per row) or {len(q_lens)} (per sample) values, got {t.numel()}")


def _readers(use_kv_cache: bool | Sequence[bool], n_samples: int) -> list[bool]:
    """Return one cache-reading flag per sample of a call (see :meth:`ColaDiT.forward`)."""
    if isinstance(use_kv_cache, bool):
        return [use_kv_cache] * n_samples
    flags = [bool(f) for f in use_kv_cache]
    if len(flags) != n_samples:
        raise DataError(f"use_kv_cache: expected one flag per sample ({n_samples}), got {len(flags)}")
    return flags


def _check_overrides(n_k: int, n_q: int, k_pos: Tensor | None, q_pos: Tensor | None, mask: Tensor | None) -> None:
    """Check explicit RoPE positions (ΣLk,), (ΣLq,) and a mask (…, ΣLq, ΣLk) against the call's lengths."""
    if (k_pos is None) != (q_pos is None):
        raise DataError("k_positions and q_positions must be given together (explicit RoPE positions)")
    if k_pos is not None and q_pos is not None and (k_pos.shape != (n_k,) or q_pos.shape != (n_q,)):
        found = (tuple(k_pos.shape), tuple(q_pos.shape))
        raise DataError(f"k_positions / q_positions: expected shapes ({n_k},) / ({n_q},), got {found}")
    if mask is not None and tuple(mask.shape[-2:]) != (n_q, n_k):
        raise DataError(f"mask: expected (1, 1, {n_q}, {n_k}) for ΣLq = {n_q}, ΣLk = {n_k}, got {tuple(mask.shape)}")


class ColaDiT(nn.Module):
    """``ColaDiTModel``: the block-causal flow-matching velocity field over latents (spec §3).

    Args:
        config: the DiT config (read it from the checkpoint's ``config.json``).
        generator: draws of the random initialisation; None uses the global RNG.
    """

    def __init__(self, config: ColaDitConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        dim = config.txt_dim
        self.txt_in = _Projection(config.txt_in_channels, dim)
        self.emb_in = TimestepEmbedding(dim, config.emb_dim)
        self.blocks = nn.ModuleList([ColaDiTBlock(config) for _ in range(config.num_layers)])
        self.txt_out_norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.txt_out_ada = AdaLN(dim, ("out",), gated=False)
        self.txt_out = _Projection(dim, config.txt_out_channels)
        self._caches = [KVCache() for _ in self.blocks]
        self.init_weights(generator)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise as the reference: xavier-uniform Linear weights, zero biases (spec §3.4).

        Args:
            generator: source of every draw; None uses the global RNG, as the reference does.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()  # weight 1, bias 0

    def clear_cache(self) -> None:
        """Forget every layer's KV history (the reference's ``set_kv_cache``)."""
        for cache in self._caches:
            cache.clear()

    def forward(
        self,
        txt: Tensor,
        k_lens: Lengths,
        q_lens: Lengths,
        timestep: Tensor | float,
        *,
        update_kv: bool = False,
        use_kv_cache: bool | Sequence[bool] = False,
        k_positions: Tensor | None = None,
        q_positions: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the velocity ``z_1 − z_0`` of the query latents (Cola time: t = 1 noise).

        Args:
            txt: (ΣLq, C) query latents, samples concatenated.
            k_lens: keys per sample: cached history read by this call + queries.
            q_lens: queries per sample (the tail of each sample's keys).
            timestep: Cola time × 1000: a number, (ΣLq,) per row or (B,) per sample.
            update_kv: append this call's keys/values to the cache, then attend to the whole history.
            use_kv_cache: attend to ``[history ; new]`` without storing (ignored when ``update_kv``); one flag
                per sample mixes samples that read their history (they map, in order, onto the cached samples)
                with fresh sequences that read none, e.g. the conditional and unconditional rows of one
                classifier-free guidance forward.
            k_positions: (ΣLk,) explicit key RoPE positions (2L training); needs ``q_positions``.
            q_positions: (ΣLq,) explicit query RoPE positions.
            mask: (1, 1, ΣLq, ΣLk) additive mask overriding the NA block-causal one (2L training).

        Returns:
            (ΣLq, C) velocity.

        Raises:
            DataError: inconsistent lengths, timesteps or positions.
        """
        k, q = layout.as_lengths(k_lens, "k_lens"), layout.as_lengths(q_lens, "q_lens")
        readers = [True] * len(q) if update_kv else _readers(use_kv_cache, len(q))
        layout.check_lengths(k, q, self._history(readers), txt.shape[0])
        _check_overrides(sum(k), sum(q), k_positions, q_positions, mask)
        h = self.txt_in.proj(txt)  # (ΣLq, H)
        emb = self.emb_in(per_token_timesteps(timestep, q, h.dtype, h.device), h.dtype)  # (ΣLq, H)
        na = self._na(k, q, h, update_kv, k_positions, q_positions, mask)
        if not all(readers):
            na = replace(na, readers=readers)
        caches = self._caches if any(readers) else [None] * len(self.blocks)
        return self._trunk(h, TokenEmbedding(emb), na, caches)

    @torch.no_grad()
    def plan(self, k_lens: Lengths, q_lens: Lengths, *, use_kv_cache: bool | Sequence[bool] = True) -> BlockPlan:
        """Make once what the calls of a generation block share (rows and cache stay fixed): mask, RoPE, history.

        :meth:`step` runs each call with it. The plan holds a copy of the history: make a new one after a commit.

        Args:
            k_lens: keys per sample, as in :meth:`forward`.
            q_lens: queries per sample.
            use_kv_cache: which samples read their cached history, as in :meth:`forward`.

        Raises:
            DataError: inconsistent lengths.
        """
        k, q = layout.as_lengths(k_lens, "k_lens"), layout.as_lengths(q_lens, "q_lens")
        readers = _readers(use_kv_cache, len(q))
        history = self._history(readers)
        layout.check_lengths(k, q, history, sum(q))
        weight = self.txt_in.proj.weight
        mask = layout.na_block_causal_mask(k, q, self.config.block_size, weight.dtype, weight.device)
        attention = BlockAttention(self._rotary(layout.q_positions(k, q, weight.device)), mask)
        if not history:
            return BlockPlan(q, attention, [None] * len(self.blocks))
        rot_k, slots = self._rotary(layout.k_positions(k, weight.device)), layout.q_slots(k, q, weight.device)
        rooms = (cache.with_room(q, readers) for cache in self._caches)  # (ΣLk, nh, hd) each
        return BlockPlan(q, attention, [BlockKV(rot_k(keys), values, slots) for keys, values in rooms])

    def step(self, txt: Tensor, timestep: Tensor | float, plan: BlockPlan) -> Tensor:
        """Predict the velocity of the rows a plan was made for, as :meth:`forward` does but faster.

        The timestep embedding and every AdaLN head run once per distinct timestep (not per row), which moves
        the result by a few float32 ulps (BLAS sums a 1-row product in another order); the mask, RoPE tables
        and history come from the plan. For inference only: the plan's history is written in place.

        Args:
            txt: (ΣLq, C) query latents, samples concatenated as planned.
            timestep: Cola time × 1000: a number, (ΣLq,) per row or (B,) per sample.
            plan: from :meth:`plan`, with the KV cache unchanged since.

        Returns:
            (ΣLq, C) velocity.

        Raises:
            DataError: ``txt`` or ``timestep`` does not fit the plan's rows.
        """
        if txt.shape[0] != sum(plan.q_lens):
            raise DataError(f"txt: the plan is for {sum(plan.q_lens)} rows (q_lens {plan.q_lens}), got {txt.shape[0]}")
        h = self.txt_in.proj(txt)  # (ΣLq, H)
        t = per_token_timesteps(timestep, plan.q_lens, h.dtype, h.device)  # (ΣLq,)
        distinct, index = torch.unique(t, return_inverse=True)  # (U,), (ΣLq,)
        emb = TokenEmbedding(self.emb_in(distinct, h.dtype), index)  # (U, H)
        return self._trunk(h, emb, plan.attention, plan.kv)

    def _trunk(self, h: Tensor, emb: TokenEmbedding, na: Attention, caches: Sequence[LayerKV]) -> Tensor:
        """Run the blocks and the output head on h (ΣLq, H); return the velocity (ΣLq, C)."""
        for block, cache in zip(self.blocks, caches, strict=True):
            h = block(h, emb, na, cache)
        h = self.txt_out_ada.modulate("out", h, self.txt_out_norm, emb)
        return self.txt_out.proj(h)  # (ΣLq, C)

    def _history(self, readers: list[bool]) -> list[int]:
        """Return the cached entries each sample of a call reads (0 for a fresh one); [] when nothing is cached."""
        cached = self._caches[0].lengths
        if not cached or not any(readers):
            return []
        if sum(readers) != len(cached):
            raise DataError(
                f"use_kv_cache: {sum(readers)} samples read the KV cache but it holds {len(cached)}; clear it first"
            )
        past = iter(cached)
        return [next(past) if r else 0 for r in readers]

    def _na(
        self,
        k: list[int],
        q: list[int],
        h: Tensor,
        update_kv: bool,
        k_positions: Tensor | None,
        q_positions: Tensor | None,
        mask: Tensor | None,
    ) -> NaAttention:
        cfg, device = self.config, h.device
        if k_positions is None or q_positions is None:
            k_positions, q_positions = layout.k_positions(k, device), layout.q_positions(k, q, device)
        if mask is None:
            mask = layout.na_block_causal_mask(k, q, cfg.block_size, h.dtype, device)
        rot_q, rot_k = self._rotary(q_positions.to(device)), self._rotary(k_positions.to(device))
        return NaAttention(q, rot_q, rot_k, mask, update_kv)

    def _rotary(self, positions: Tensor) -> Rotary:
        return Rotary.at(positions, self.config.rope_dim, ROPE_THETA, "interleaved")
