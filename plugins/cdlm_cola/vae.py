"""The Cola Text VAE: tokens ↔ latents in the NA layout (Cola spec §2). No loss, no sampling loop, no file I/O.

Module and parameter names are the official ``ColaTextVAEModel`` ones (spec §2.1), so a release state dict
loads with ``strict=True``. The encoder is bidirectional within a VAE block and causal across blocks; the
decoder predicts token j from latent j (no shift) and, for block-wise decoding, reads a per-sample KV cache
that the caller holds: :meth:`ColaTextVAE.decode_commit` returns it extended, nothing is stored on the module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdlm.errors import DataError
from cdlm_cola import layout
from cdlm_cola.config import ColaVaeConfig
from cdlm_cola.kv_cache import KVCache, LayerKV
from cdlm_cola.layout import Lengths, NaAttention
from cdlm_cola.rope import Rotary

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance (spec §2.2)


class Posterior(NamedTuple):
    """The diagonal Gaussian posterior q(z | x) of some latents (spec §2.2).

    Attributes:
        mean: (N, d) LayerNormed mean, also the mode used at inference.
        logvar: (N, d) log-variance clamped to [−30, 20].
        std: (N, d) ``exp(logvar / 2)``.
    """

    mean: Tensor
    logvar: Tensor
    std: Tensor


def posterior(params: Tensor) -> Posterior:
    """Split encoder parameters (N, 2d) ``[mean | raw logvar]`` into the posterior's moments."""
    mean, logvar = params.chunk(2, dim=-1)  # (N, d) each
    logvar = logvar.clamp(*LOGVAR_RANGE)
    return Posterior(mean, logvar, torch.exp(0.5 * logvar))


def posterior_sample(params: Tensor, generator: torch.Generator) -> Tensor:
    """Draw z = mean + std·ε (N, d) from the posterior of ``params`` (N, 2d).

    ε is drawn on the generator's device (a CPU generator gives device-independent noise) and then moved.
    """
    post = posterior(params)
    eps = torch.randn(post.mean.shape, generator=generator, device=generator.device, dtype=params.dtype)
    return post.mean + post.std * eps.to(params.device)


class VaeEncoding(NamedTuple):
    """What :meth:`ColaTextVAE.encode` returns, one tensor per sample.

    Attributes:
        latents: (n_i, d) posterior modes (the LayerNormed means).
        params: (n_i, 2d) ``[mean | unclamped logvar]``, the reference's ``.parameters``; None when the config
            has ``use_variation=False``.
    """

    latents: list[Tensor]
    params: list[Tensor] | None


class TextVAEBlock(nn.Module):
    """One encoder/decoder block (spec §2.3), including the release's post-norm variant (H2)."""

    def __init__(self, cfg: ColaVaeConfig) -> None:
        super().__init__()
        d, eps = cfg.dim, cfg.layer_norm_eps
        self.num_heads, self.post_norm, self.clip_qkv, self.act = cfg.num_heads, cfg.post_norm, cfg.clip_qkv, cfg.act
        self.norm_attn = nn.LayerNorm(d, eps=eps, elementwise_affine=cfg.layer_norm_affine)
        self.qkv_proj = nn.Linear(d, 3 * d, bias=cfg.qk_bias)  # rows [q | k | v], shared_heads_kv = 1
        self.q_norm = nn.LayerNorm(d, eps=eps, elementwise_affine=cfg.qk_norm_affine) if cfg.qk_norm else None
        self.k_norm = nn.LayerNorm(d, eps=eps, elementwise_affine=cfg.qk_norm_affine) if cfg.qk_norm else None
        self.attn_out_proj = nn.Linear(d, d, bias=cfg.bias)
        self.norm_ffn = nn.LayerNorm(d, eps=eps)  # affine always
        self.ffn_proj = nn.Linear(d, cfg.ffn_dim, bias=cfg.bias)
        self.ffn_out = nn.Linear(cfg.ffn_dim // 2 if cfg.act == "swiglu" else cfg.ffn_dim, d, bias=cfg.bias)

    def ffn(self, x: Tensor) -> Tensor:
        """Feed-forward (L, D) → (L, D); SwiGLU takes ``[value, gate]`` in that order."""
        h = self.ffn_proj(x)  # (L, ffn_dim)
        if self.act == "swiglu":
            value, gate = h.chunk(2, dim=-1)
            h = F.silu(gate) * value  # (L, ffn_dim/2)
        else:
            h = F.silu(h) if self.act == "silu" else F.gelu(h)
        return self.ffn_out(h)

    def forward(self, x: Tensor, na: NaAttention, cache: LayerKV | None) -> tuple[Tensor, LayerKV | None]:
        """Map x (ΣLq, D) to (ΣLq, D) and, on a commit, the new history; cached keys are raw (before k_norm)."""
        h = x if self.post_norm else self.norm_attn(x)
        qkv = self.qkv_proj(h)  # (ΣLq, 3D)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)  # (ΣLq, D) each
        k, v, committed = na.history(cache, k, v)  # (ΣLk, D)
        if self.q_norm is not None and self.k_norm is not None:  # over the full width, all heads jointly (H3)
            q, k = self.q_norm(q).to(q.dtype), self.k_norm(k).to(q.dtype)
        heads = (self.num_heads, -1)
        attn = self.attn_out_proj(na.attend(q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads)))
        if self.post_norm:  # parity: modeling_cola_vae.py, spec §2.3 — LN on the residual stream, then on the FFN
            x = self.norm_attn(x) + attn
            return x + self.norm_ffn(self.ffn(x)), committed
        x = x + attn
        return x + self.ffn(self.norm_ffn(x)), committed


class _Encoder(nn.Module):
    def __init__(self, cfg: ColaVaeConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.wte = nn.Embedding(cfg.vocab_size + 1, d)
        self.patch_embedder = nn.Conv1d(d, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.blocks = nn.ModuleList([TextVAEBlock(cfg) for _ in range(cfg.encoder_num_blocks)])
        out_dim = 2 * cfg.latent_dim if cfg.use_variation else cfg.latent_dim
        self.final_layer = nn.Linear(d, out_dim, bias=cfg.bias)
        normed = cfg.encoder_last_ln or not cfg.use_variation
        ln = nn.LayerNorm(cfg.latent_dim, eps=cfg.layer_norm_eps, elementwise_affine=False)
        self.final_norm = ln if normed else nn.Identity()


class _Decoder(nn.Module):
    def __init__(self, cfg: ColaVaeConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.in_layer = nn.Linear(cfg.latent_dim, d, bias=cfg.bias)
        self.blocks = nn.ModuleList([TextVAEBlock(cfg) for _ in range(cfg.decoder_num_blocks)])
        self.unpatch_layer = nn.Linear(d, cfg.patch_size * d)
        self.final_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.final_layer = nn.Linear(d, cfg.vocab_size, bias=cfg.bias)


class ColaTextVAE(nn.Module):
    """``ColaTextVAEModel``: encoder q(z | x) and decoder p(x | z) over the NA layout (spec §2).

    Args:
        config: the VAE config (read it from the checkpoint's ``config.json``); its own ``block_size`` drives
            the VAE masks, whatever the DiT's is (H5).
        generator: draws of the random initialisation; None uses the global RNG.
    """

    def __init__(self, config: ColaVaeConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.encoder = _Encoder(config)
        self.decoder = _Decoder(config)
        self.config = config
        self.init_weights(generator)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise as the reference (spec §3.4): truncated-normal Linear/Embedding weights, zero biases.

        Args:
            generator: source of every draw; None uses the global RNG, as the reference does.
        """
        std, cutoff = self.config.init_std, self.config.init_cutoff_factor
        bound = float("inf") if cutoff is None else cutoff * std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=std, a=-bound, b=bound, generator=generator)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):  # untouched by the reference's HF init: PyTorch's default
                limit = 1.0 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(module.weight, -limit, limit, generator=generator)
                nn.init.uniform_(module.bias, -limit, limit, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()  # weight 1, bias 0

    def _na(self, k_lens: list[int], q_lens: list[int], h: Tensor, commit: bool) -> NaAttention:
        cfg, device = self.config, h.device
        mask = (
            layout.na_block_causal_mask(k_lens, q_lens, cfg.block_size, h.dtype, device) if cfg.block_causal else None
        )
        head_dim, theta = cfg.dim // cfg.num_heads, cfg.rope_theta
        rot_q = Rotary.at(layout.q_positions(k_lens, q_lens, device), head_dim, theta, "half")
        rot_k = Rotary.at(layout.k_positions(k_lens, device), head_dim, theta, "half")
        return NaAttention(q_lens, rot_q, rot_k, mask, commit)

    def encode(self, ids: Sequence[Tensor]) -> VaeEncoding:
        """Encode token ids, one 1-D tensor per sample, into per-sample latents (spec §2.2).

        Args:
            ids: (L_i,) int64 per sample; each L_i a positive multiple of ``patch_size`` (callers also align to
                ``patch_size · block_size``).

        Returns:
            Posterior modes (n_i, d) and parameters (n_i, 2d) per sample, n_i = L_i / patch_size.

        Raises:
            DataError: a sample is not 1-D or its length is not a positive multiple of ``patch_size``.
        """
        ps = self.config.patch_size
        for i, row in enumerate(ids):
            if row.ndim != 1 or row.numel() == 0 or row.numel() % ps:
                raise DataError(f"ids[{i}]: expected a non-empty 1-D tensor of length k·{ps}, got {tuple(row.shape)}")
        n_lens = [row.numel() // ps for row in ids]
        x = self.encoder.wte(torch.cat(list(ids)))  # (ΣL, D)
        x = self.encoder.patch_embedder(x.t()[None])[0].t()  # (ΣN, D); windows never straddle samples
        na = self._na(n_lens, n_lens, x, commit=False)
        for block in self.encoder.blocks:
            x, _ = block(x, na, None)
        out = self.encoder.final_layer(x)  # (ΣN, 2d) or (ΣN, d)
        if not self.config.use_variation:
            return VaeEncoding(list(self.encoder.final_norm(out).split(n_lens)), None)
        mean, logvar = out.chunk(2, dim=-1)
        mean = self.encoder.final_norm(mean)  # parameter-free LayerNorm on the mean only (spec §2.2 step 5)
        params = torch.cat([mean, logvar], dim=-1)  # (ΣN, 2d)
        return VaeEncoding(list(mean.split(n_lens)), list(params.split(n_lens)))

    def decode(self, z: Tensor, k_lens: Lengths, q_lens: Lengths, *, cache: KVCache | None = None) -> Tensor:
        """Decode latents into token logits (spec §2.4), after the history in ``cache`` (only read).

        Args:
            z: (ΣLq, d) latents of the query positions, samples concatenated.
            k_lens: latents per sample visible to the queries: cached history + queries.
            q_lens: query latents per sample (the tail of each sample's keys).
            cache: the decoder's history (:meth:`decode_commit` makes it); None: no history.

        Returns:
            (ΣLq·ps, V) logits; token j is predicted from latent ⌊j / ps⌋ (no shift).

        Raises:
            DataError: the lengths do not match ``z`` or the cached history.
        """
        return self._decode(z, k_lens, q_lens, cache, commit=False)[0]

    def decode_commit(
        self, z: Tensor, k_lens: Lengths, q_lens: Lengths, cache: KVCache | None = None
    ) -> tuple[Tensor, KVCache]:
        """Decode as :meth:`decode` does, and return ``cache`` with this call's keys and values appended.

        The reference's ``update_kv=True`` decode: the prefill and each block's decode (spec §6.1 steps 6, 7.3).
        ``cache`` itself is left as it is; None starts a new one. Arguments, returned logits and errors are
        those of :meth:`decode`.
        """
        logits, committed = self._decode(z, k_lens, q_lens, cache, commit=True)
        return logits, KVCache(tuple(layer for layer in committed if layer is not None))

    def _decode(
        self, z: Tensor, k_lens: Lengths, q_lens: Lengths, cache: KVCache | None, commit: bool
    ) -> tuple[Tensor, list[LayerKV | None]]:
        k, q = layout.as_lengths(k_lens, "k_lens"), layout.as_lengths(q_lens, "q_lens")
        cache = KVCache.empty(len(self.decoder.blocks)) if cache is None else cache
        layout.check_lengths(k, q, cache.lengths, z.shape[0])
        h = self.decoder.in_layer(z)  # (ΣLq, D)
        na = self._na(k, q, h, commit)
        committed = []
        for block, layer in zip(self.decoder.blocks, cache.layers, strict=True):
            h, kv = block(h, na, layer)
            committed.append(kv)
        h = self.decoder.unpatch_layer(h)  # (ΣLq, ps·D), channel-major "(c ps)"
        h = h.unflatten(-1, (-1, self.config.patch_size)).transpose(1, 2).flatten(0, 1)  # (ΣLq·ps, D)
        return self.decoder.final_layer(self.decoder.final_norm(h)), committed  # (ΣLq·ps, V)
