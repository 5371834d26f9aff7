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
        index: (ΣLq,) int64, the row of ``emb`` of every query row; None when ``emb`` has one per row or N = 1.
        heads: every AdaLN head's output on ``emb`` (N, out), made ahead (:meth:`ColaDiT.step`), or None.
    """

    emb: Tensor
    index: Tensor | None = None
    heads: dict[nn.Module, Tensor] | None = None

    def head(self, module: nn.Module) -> Tensor:
        """Return the AdaLN head ``module`` on every query row: (ΣLq, out), or (1, out) to broadcast."""
        x = module(self.emb) if self.heads is None else self.heads[module]
        return x if self.index is None else x[self.index]


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
        """Return ``norm(h)·(1 + scale) + shift`` (L, H), fused; shift is the first half."""
        shift, scale = emb.head(getattr(self, f"{name}_in")).chunk(2, dim=-1)
        return torch.addcmul(shift, norm(h), 1 + scale)

    def gate(self, name: str, h: Tensor, residual: Tensor, emb: TokenEmbedding) -> Tensor:
        """Return ``h·gate + residual`` (L, H), fused."""
        return torch.addcmul(residual, h, emb.head(getattr(self, f"{name}_out")))


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
        self._table: dict[float, tuple[Tensor, dict[nn.Module, Tensor]]] = {}  # timestep → (emb, AdaLN heads)
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
        """Forget every layer's KV history (the reference's ``set_kv_cache``) and :meth:`step`'s AdaLN table."""
        for cache in self._caches:
            cache.clear()
        self._table.clear()

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
            mask: additive mask overriding the NA block-causal one (2L training): (1, 1, ΣLq, ΣLk), or per sample
                (1 or B, 1, Lq, Lk) for samples of equal lengths, which then attend as a batch.

        Returns:
            (ΣLq, C) velocity.

        Raises:
            DataError: inconsistent lengths, timesteps or positions.
        """
        k, q = layout.as_lengths(k_lens, "k_lens"), layout.as_lengths(q_lens, "q_lens")
        readers = [True] * len(q) if update_kv else layout.cache_readers(use_kv_cache, len(q))
        layout.check_lengths(k, q, self._history(readers), txt.shape[0])
        batch = layout.check_overrides(k, q, k_positions, q_positions, mask)
        h = self.txt_in.proj(txt)  # (ΣLq, H)
        emb = self.emb_in(layout.per_token_timesteps(timestep, q, h.dtype, h.device), h.dtype)  # (ΣLq, H)
        na = replace(self._na(k, q, h, update_kv, k_positions, q_positions, mask), batch=batch)
        if not all(readers):
            na = replace(na, readers=readers)
        caches = self._caches if any(readers) else [None] * len(self.blocks)
        return self._trunk(h, TokenEmbedding(emb), na, caches)

    @torch.no_grad()
    def plan(self, k_lens: Lengths, q_lens: Lengths, *, use_kv_cache: bool | Sequence[bool] = True) -> BlockPlan:
        """Make once what the calls of a generation block share (rows and cache stay fixed): mask, RoPE, history.

        :meth:`step` runs each call with it. The samples are laid out side by side, padded
        (:func:`~cdlm_cola.layout.padded_block_layout`); the plan holds a copy of the history: make a new one
        after a commit.

        Args:
            k_lens: keys per sample, as in :meth:`forward`.
            q_lens: queries per sample, all equal (one block per row).
            use_kv_cache: which samples read their cached history, as in :meth:`forward`.

        Raises:
            DataError: inconsistent or unequal lengths.
        """
        k, q = layout.as_lengths(k_lens, "k_lens"), layout.as_lengths(q_lens, "q_lens")
        readers = layout.cache_readers(use_kv_cache, len(q))
        history = self._history(readers)
        layout.check_lengths(k, q, history, sum(q))
        if len(set(q)) > 1:
            raise DataError(f"q_lens: a plan is for rows of one block each (equal q_lens), got {q}")
        cfg, weight = self.config, self.txt_in.proj.weight
        hist = history or [0] * len(q)
        width, slots, mask = layout.padded_block_layout(hist, q[0], cfg.block_size, weight.dtype, weight.device)
        bias = mask.repeat_interleave(cfg.heads, dim=0)  # (B·nh, n, W)
        attention = BlockAttention(self._rotary(layout.q_positions(k, q, weight.device)), bias, q[0])
        if not history:
            return BlockPlan(q, attention, [None] * len(self.blocks))
        rot_k = self._rotary(layout.k_positions(hist, weight.device))  # (ΣH) history positions
        flat = (cache.flat() for cache in self._caches)  # (ΣH, nh, hd) each
        kv = [BlockKV.laid_out(rot_k(keys), values, slots, len(q), width) for keys, values in flat]
        return BlockPlan(q, attention, kv)

    def step(self, txt: Tensor, timestep: Tensor | float, plan: BlockPlan) -> Tensor:
        """Predict the velocity of the rows a plan was made for, as :meth:`forward` does but faster.

        The timestep embedding and every AdaLN head run once per distinct timestep value, kept until
        :meth:`clear_cache` (a generation's blocks share their Euler grid); the mask, RoPE tables and history
        come from the plan. Batched rows sum in another order than :meth:`forward`'s, which moves the result by
        a few float32 ulps. For inference only: the plan's history is written in place.

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
        t = layout.per_token_timesteps(timestep, plan.q_lens, h.dtype, h.device)  # (ΣLq,)
        distinct, index = torch.unique(t, return_inverse=True)  # (U,), (ΣLq,)
        return self._trunk(h, self._heads(distinct.tolist(), index, h.dtype), plan.attention, plan.kv)

    @torch.no_grad()
    def _heads(self, times: list[float], index: Tensor, dtype: torch.dtype) -> TokenEmbedding:
        """Return the embedding of the distinct timesteps ``times`` with every AdaLN head made, from the table."""
        missing = [t for t in times if t not in self._table]
        if missing:
            emb = self.emb_in(torch.tensor(missing, device=index.device), dtype)  # (M, E)
            heads = [m for m in self.modules() if isinstance(m, AdaLN)]
            outputs = {head: head(emb) for ada in heads for head in ada.children()}  # (M, out) each
            for i, t in enumerate(missing):
                self._table[t] = (emb[i : i + 1], {head: out[i : i + 1] for head, out in outputs.items()})
        rows = [self._table[t] for t in times]
        if len(rows) == 1:
            return TokenEmbedding(rows[0][0], None, rows[0][1])
        stacked = {head: torch.cat([r[1][head] for r in rows]) for head in rows[0][1]}  # (U, out) each
        return TokenEmbedding(torch.cat([r[0] for r in rows]), index, stacked)

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
        rot_q, rot_k = (self._rotary(p.to(device), whole_head=False) for p in (q_positions, k_positions))
        return NaAttention(q, rot_q, rot_k, mask, update_kv)

    def _rotary(self, positions: Tensor, whole_head: bool = True) -> Rotary:
        width = self.config.head_dim if whole_head else None
        return Rotary.at(positions, self.config.rope_dim, ROPE_THETA, "interleaved", width)
