"""The Cola block-causal DiT prior over latents in the NA layout (Cola spec §3). No loss, no sampling loop.

Cola's own time convention holds here: t = 1 is noise, the timestep input is on the 0..1000 scale, and the
output is the velocity ``z_1 − z_0`` (spec §5); :mod:`cdlm_cola.schedule` converts to core time. Module and
parameter names are the official ``ColaDiTModel`` ones (spec §3.1); the deterministic ``rope.freqs`` buffers
are not module state (RoPE is computed from positions, H1) and :mod:`cdlm_cola.state_dict` handles them.
:meth:`ColaDiT.forward` works as the reference, per call; :meth:`ColaDiT.plan` and :meth:`ColaDiT.step` are
the generation fast path, which does the work that the Euler steps of a block share once. The module holds no
generation state: the KV history is a :class:`~cdlm_cola.kv_cache.KVCache` the caller passes (``cache=``) and
:meth:`ColaDiT.commit` returns extended, and the fast path's timestep table travels in the plan.
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
from cdlm_cola.kv_cache import BlockKV, KVCache, LayerKV, cache_readers, read_lengths
from cdlm_cola.layout import BlockAttention, BlockPlan, HeadTable, Lengths, NaAttention
from cdlm_cola.rope import Rotary

SINUSOIDAL_DIM = 256  # width of the sinusoidal timestep features, fixed in the reference
ROPE_THETA = 10000.0
Attention = NaAttention | BlockAttention  # per call (the reference's way) or per block (the fast path)
History = LayerKV | BlockKV | None  # a layer's cache, its per-block history, or nothing to read


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

    def forward(self, x: Tensor, na: Attention, cache: History) -> tuple[Tensor, LayerKV | None]:
        """Map x (ΣLq, H) to (ΣLq, H) and, on a commit, the new history; cached keys are after norm_k, before RoPE."""
        q, k, v = self.proj_qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(1)  # (ΣLq, nh, hd) each
        q, k = self.norm_q(q), self.norm_k(k)
        k, v, committed = na.history(cache, k, v)  # (ΣLk, nh, hd)
        return self.proj_out(na.attend(q, k, v)), committed


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

    def forward(self, h: Tensor, emb: TokenEmbedding, na: Attention, cache: History) -> tuple[Tensor, LayerKV | None]:
        """Map h (ΣLq, H) under the rows' timestep embeddings to (ΣLq, H), and the attention's committed history."""
        a, committed = self.msa(self.ada.modulate("msa", h, self.msa_norm, emb), na, cache)
        h = self.ada.gate("msa", a, h, emb)
        m = self.mlp(self.ada.modulate("mlp", h, self.mlp_norm, emb))
        return self.ada.gate("mlp", m, h, emb), committed


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

    def forward(
        self,
        txt: Tensor,
        k_lens: Lengths,
        q_lens: Lengths,
        timestep: Tensor | float,
        *,
        cache: KVCache | None = None,
        readers: Sequence[bool] | None = None,
        k_positions: Tensor | None = None,
        q_positions: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the velocity ``z_1 − z_0`` of the query latents (Cola time: t = 1 noise); ``cache`` is only read.

        Args:
            txt: (ΣLq, C) query latents, samples concatenated.
            k_lens: keys per sample: cached history read by this call + queries.
            q_lens: queries per sample (the tail of each sample's keys).
            timestep: Cola time × 1000: a number, (ΣLq,) per row or (B,) per sample.
            cache: the history to attend to, ``[history ; new]`` per sample (:meth:`commit` makes it); None:
                no history.
            readers: with ``cache``, one flag per sample: True if it continues a cached sample (they map, in
                order, onto the cached samples), False for a fresh sequence that reads none, e.g. the
                unconditional rows of one classifier-free guidance forward. None: every sample continues one.
            k_positions: (ΣLk,) explicit key RoPE positions (2L training); needs ``q_positions``.
            q_positions: (ΣLq,) explicit query RoPE positions.
            mask: additive mask overriding the NA block-causal one (2L training): (1, 1, ΣLq, ΣLk), or per sample
                (1 or B, 1, Lq, Lk) for samples of equal lengths, which then attend as a batch.

        Returns:
            (ΣLq, C) velocity.

        Raises:
            DataError: inconsistent lengths, readers, timesteps or positions.
        """
        k, q = layout.as_lengths(k_lens, "k_lens"), layout.as_lengths(q_lens, "q_lens")
        flags = cache_readers(readers, len(q))
        history = read_lengths(cache, flags)
        layout.check_lengths(k, q, history, txt.shape[0])
        batch = layout.check_overrides(k, q, k_positions, q_positions, mask)
        h = self.txt_in.proj(txt)  # (ΣLq, H)
        emb = TokenEmbedding(self.emb_in(layout.per_token_timesteps(timestep, q, h.dtype, h.device), h.dtype))
        na = replace(self._na(k, q, h, k_positions, q_positions, mask), batch=batch)
        if not all(flags):
            na = replace(na, readers=flags)
        layers = cache.layers if cache is not None and history else (None,) * len(self.blocks)
        return self._trunk(h, emb, na, layers)[0]

    def commit(
        self, txt: Tensor, k_lens: Lengths, q_lens: Lengths, timestep: Tensor | float, cache: KVCache | None = None
    ) -> tuple[Tensor, KVCache]:
        """Run a call over ``cache`` as :meth:`forward` does, and return ``cache`` with its keys and values appended.

        The reference's ``update_kv=True`` call: the prefill and each block's commit at t = 0 (spec §6.1 steps 6,
        7.6). Every sample continues a cached one (or starts the cache). ``cache`` itself is left as it is.

        Args:
            txt: (ΣLq, C) latents to commit, samples concatenated.
            k_lens: keys per sample: cached history + new entries.
            q_lens: new entries per sample.
            timestep: Cola time × 1000, as in :meth:`forward`.
            cache: the history so far; None: none yet.

        Returns:
            The (ΣLq, C) velocity and the extended cache.

        Raises:
            DataError: the lengths do not match ``txt`` or the cached history.
        """
        k, q = layout.as_lengths(k_lens, "k_lens"), layout.as_lengths(q_lens, "q_lens")
        cache = KVCache.empty(len(self.blocks)) if cache is None else cache
        layout.check_lengths(k, q, cache.lengths, txt.shape[0])
        h = self.txt_in.proj(txt)  # (ΣLq, H)
        emb = TokenEmbedding(self.emb_in(layout.per_token_timesteps(timestep, q, h.dtype, h.device), h.dtype))
        na = replace(self._na(k, q, h), commit=True)
        out, committed = self._trunk(h, emb, na, cache.layers)
        return out, KVCache(tuple(layer for layer in committed if layer is not None))

    @torch.no_grad()
    def plan(
        self,
        k_lens: Lengths,
        q_lens: Lengths,
        *,
        cache: KVCache | None = None,
        readers: Sequence[bool] | None = None,
        heads: HeadTable | None = None,
    ) -> BlockPlan:
        """Make once what the calls of a generation block share (rows and history stay fixed): mask, RoPE, history.

        :meth:`step` runs each call with it. The samples are laid out side by side, padded
        (:func:`~cdlm_cola.layout.padded_block_layout`); the plan holds its own copy of the history.

        Args:
            k_lens: keys per sample, as in :meth:`forward`.
            q_lens: queries per sample, all equal (one block per row).
            cache: the history the rows read, as in :meth:`forward`.
            readers: which samples read it, as in :meth:`forward`.
            heads: the timestep table to read and fill, shared by a generation's plans; None: a new one.

        Raises:
            DataError: inconsistent or unequal lengths.
        """
        k, q = layout.as_lengths(k_lens, "k_lens"), layout.as_lengths(q_lens, "q_lens")
        history = read_lengths(cache, cache_readers(readers, len(q)))
        layout.check_lengths(k, q, history, sum(q))
        if len(set(q)) > 1:
            raise DataError(f"q_lens: a plan is for rows of one block each (equal q_lens), got {q}")
        cfg, weight = self.config, self.txt_in.proj.weight
        hist = history or [0] * len(q)
        width, slots, mask = layout.padded_block_layout(hist, q[0], cfg.block_size, weight.dtype, weight.device)
        bias = mask.repeat_interleave(cfg.heads, dim=0)  # (B·nh, n, W)
        attention = BlockAttention(self._rotary(layout.q_positions(k, q, weight.device)), bias, q[0])
        table: HeadTable = {} if heads is None else heads
        if cache is None or not history:
            return BlockPlan(q, attention, [None] * len(self.blocks), table)
        rot_k = self._rotary(layout.k_positions(hist, weight.device))  # (ΣH) history positions
        flat = (layer.flat() for layer in cache.layers)  # (ΣH, nh, hd) each
        kv = [BlockKV.laid_out(rot_k(keys), values, slots, len(q), width) for keys, values in flat]
        return BlockPlan(q, attention, kv, table)

    def step(self, txt: Tensor, timestep: Tensor | float, plan: BlockPlan) -> Tensor:
        """Predict the velocity of the rows a plan was made for, as :meth:`forward` does but faster.

        The timestep embedding and every AdaLN head run once per distinct timestep value and are kept in the
        plan's table (a generation's blocks share their Euler grid); the mask, RoPE tables and history come
        from the plan. Batched rows sum in another order than :meth:`forward`'s, which moves the result by a
        few float32 ulps. For inference only: each call writes its keys into the plan's history slots.

        Args:
            txt: (ΣLq, C) query latents, samples concatenated as planned.
            timestep: Cola time × 1000: a number, (ΣLq,) per row or (B,) per sample.
            plan: from :meth:`plan`.

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
        emb = self._heads(distinct.tolist(), index, h.dtype, plan.heads)
        return self._trunk(h, emb, plan.attention, plan.kv)[0]

    @torch.no_grad()
    def _heads(self, times: list[float], index: Tensor, dtype: torch.dtype, table: HeadTable) -> TokenEmbedding:
        """Return the embedding of the distinct timesteps ``times`` with every AdaLN head made, from ``table``."""
        missing = [t for t in times if t not in table]
        if missing:
            emb = self.emb_in(torch.tensor(missing, device=index.device), dtype)  # (M, E)
            heads = [m for m in self.modules() if isinstance(m, AdaLN)]
            outputs = {head: head(emb) for ada in heads for head in ada.children()}  # (M, out) each
            for i, t in enumerate(missing):
                table[t] = (emb[i : i + 1], {head: out[i : i + 1] for head, out in outputs.items()})
        rows = [table[t] for t in times]
        if len(rows) == 1:
            return TokenEmbedding(rows[0][0], None, rows[0][1])
        stacked = {head: torch.cat([r[1][head] for r in rows]) for head in rows[0][1]}  # (U, out) each
        return TokenEmbedding(torch.cat([r[0] for r in rows]), index, stacked)

    def _trunk(
        self, h: Tensor, emb: TokenEmbedding, na: Attention, layers: Sequence[History]
    ) -> tuple[Tensor, list[LayerKV | None]]:
        """Run the blocks and the output head on h (ΣLq, H); return the velocity (ΣLq, C) and committed layers."""
        committed = []
        for block, layer in zip(self.blocks, layers, strict=True):
            h, kv = block(h, emb, na, layer)
            committed.append(kv)
        h = self.txt_out_ada.modulate("out", h, self.txt_out_norm, emb)
        return self.txt_out.proj(h), committed  # (ΣLq, C)

    def _na(
        self, k: list[int], q: list[int], h: Tensor, k_pos: Tensor | None = None, q_pos: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> NaAttention:  # fmt: skip
        cfg, device = self.config, h.device
        if k_pos is None or q_pos is None:
            k_pos, q_pos = layout.k_positions(k, device), layout.q_positions(k, q, device)
        if mask is None:
            mask = layout.na_block_causal_mask(k, q, cfg.block_size, h.dtype, device)
        rot_q, rot_k = (self._rotary(p.to(device), whole_head=False) for p in (q_pos, k_pos))
        return NaAttention(q, rot_q, rot_k, mask)

    def _rotary(self, positions: Tensor, whole_head: bool = True) -> Rotary:
        width = self.config.head_dim if whole_head else None
        return Rotary.at(positions, self.config.rope_dim, ROPE_THETA, "interleaved", width)
