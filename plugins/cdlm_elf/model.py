"""The ELF network (ELF spec §1) and the Denoiser / Discretizer views that share it.

Sequence layout: [time ×4][SC-CFG ×4][mode ×4][text ×L]. The 12 prefix tokens are not rotated; text tokens get
interleaved-pair RoPE at positions 0..L−1. Two heads read the last hidden state: the flow head (RMSNorm + Linear,
x-prediction) and the decoder head (GELU-tanh MLP to the vocabulary) on the *pre*-final-norm state.
No loss, no sampling loop, no file I/O. Module names are ours; ``state_dict.py`` maps the official ones.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdlm.errors import DataError, RecipeError
from cdlm.interfaces import Denoiser, Discretizer
from cdlm.sampling.tokens import greedy_linear
from cdlm_elf.conditioning import ElfCond
from cdlm_elf.config import ElfConfig

ROPE_THETA = 10000.0
FREQ_DIM = 256  # sinusoidal features of the time / scale embedders (spec §1.3)
GEMM_WIDTH = 16  # SwiGLU's w12 output is padded to a multiple of this at inference (fp32 CPU GEMM blocking)


def full_precision(device: torch.device) -> AbstractContextManager:
    """Return a region with autocast off on ``device``: the fp32 parts of spec §1.2 (a no-op for CPU fp32)."""
    return torch.autocast(device.type, enabled=False)


class RMSNorm(nn.Module):
    """RMSNorm with the variance in fp32 and ``inv_std`` cast back to the input dtype (spec §1.3)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # the fused kernel; bit-identical to the lines below in fp32
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)  # (..., 1) fp32 even under autocast
        inv_std = torch.rsqrt(variance + self.eps).to(x.dtype)
        return self.weight.to(x.dtype) * (x * inv_std)


class ScalarEmbedder(nn.Module):
    """Embed a raw scalar per row (time t ∈ [0, 1] or SC-CFG scale w): [cos, sin] features, then an MLP."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, s: Tensor) -> Tensor:
        half = FREQ_DIM // 2
        k = torch.arange(half, dtype=torch.float32, device=s.device)
        freqs = torch.exp(-math.log(10000.0) * k / half)  # (half,); no ×1000 on t (spec §1.3)
        args = s.float()[:, None] * freqs  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (B, 256) → (B, H); cos first


def rope_tables(
    head_dim: int, length: int, num_prefix: int, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Build the RoPE cos/sin tables, (num_prefix + length, head_dim) fp32 each (spec §1.3).

    Prefix rows are the identity rotation (cos 1, sin 0); text rows rotate pair j of position p by p·θ^(−2j/hd),
    each angle repeated twice ([f0, f0, f1, f1, …]) for the interleaved-pair layout.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim  # (hd/2,)
    freqs = 1.0 / ROPE_THETA**exponent
    pos = torch.arange(length, dtype=torch.float32, device=device) / length * length  # parity: layers.py, spec §1.3
    angles = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (L, hd)
    cos = torch.cat([torch.ones(num_prefix, head_dim, device=device), torch.cos(angles)])  # (P + L, hd)
    sin = torch.cat([torch.zeros(num_prefix, head_dim, device=device), torch.sin(angles)])  # (P + L, hd)
    return cos, sin


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (GPT-J style) of x (B, nh, N, hd): (x₂ᵢ, x₂ᵢ₊₁) → (x₂ᵢ·c − x₂ᵢ₊₁·s, x₂ᵢ₊₁·c + x₂ᵢ·s).

    In fp32 that is the complex product (x₂ᵢ + i·x₂ᵢ₊₁)·(c + i·s): one fused kernel, bit-identical to the real
    form used for other dtypes (tests/plugins/elf/test_model.py).
    """
    if x.dtype == torch.float32:
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())  # (B, nh, N, hd/2)
        angle = torch.complex(cos[:, 0::2].float(), sin[:, 0::2].float())  # (N, hd/2); tables repeat each angle
        return torch.view_as_real(pairs * angle).flatten(-2)  # (B, nh, N, hd)
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, nh, N, hd/2) each
    rotated = torch.stack((-odd, even), dim=-1).flatten(-2)  # (B, nh, N, hd)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention; q and k are RMS-normalised per head *before* RoPE (spec §1.3)."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden // num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
        B, N, H = h.shape
        q, k, v = self.qkv(h).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 × (B, nh, N, hd)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, nh, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, H))  # (B, N, H)


class SwiGLU(nn.Module):
    """``w3(silu(a)·b)`` with ``a, b = w12(h).chunk(2)``; inner width ``int(int(H·mlp_ratio)·2/3)`` (spec §1.3)."""

    def __init__(self, hidden: int, mlp_ratio: float) -> None:
        super().__init__()
        self.inner = int(int(hidden * mlp_ratio) * 2 / 3)
        self.w12 = nn.Linear(hidden, 2 * self.inner)
        self.w3 = nn.Linear(self.inner, hidden)

    def forward(self, h: Tensor) -> Tensor:
        weight, bias = self.w12.weight, self.w12.bias
        pad = -weight.shape[0] % GEMM_WIDTH
        if pad and not torch.is_grad_enabled():
            # inference: an output width off the GEMM's multiple (1364 at width 256) takes a slow kernel; zero rows
            # added to the weight only add output columns, every other column keeps its value (measured 15–25 %)
            weight, bias = F.pad(weight, (0, 0, 0, pad)), F.pad(bias, (0, pad))
        a, b = F.linear(h, weight, bias)[..., : 2 * self.inner].chunk(2, dim=-1)  # (B, N, Hf) each
        return self.w3(F.silu(a) * b)  # (B, N, H)


class Block(nn.Module):
    """Pre-norm transformer block: attention, then SwiGLU, each on a residual."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden)
        self.attn = Attention(hidden, num_heads)
        self.norm2 = RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, mlp_ratio)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None) -> Tensor:
        h = h + self.attn(self.norm1(h), cos, sin, key_mask)
        return h + self.mlp(self.norm2(h))


class FlowHead(nn.Module):
    """RMSNorm + Linear(H → C): the x-prediction (clean normalised latent)."""

    def __init__(self, hidden: int, latent_dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.linear = nn.Linear(hidden, latent_dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(self.norm(h))


class DecoderHead(nn.Module):
    """Token logits from the un-normalised hidden state: ``unembed(gelu_tanh(proj(h)))`` (spec §1.2 step 10)."""

    def __init__(self, hidden: int, latent_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, latent_dim)  # official `proj_kernel` (H, C), stored (in, out)
        self.unembed = nn.Linear(latent_dim, vocab_size)  # official `unembed_kernel` (C, V), stored (in, out)

    def features(self, h: Tensor) -> Tensor:
        """Return the vocabulary projection's input ``gelu_tanh(proj(h))`` (..., C)."""
        return F.gelu(self.proj(h), approximate="tanh")

    def forward(self, h: Tensor) -> Tensor:
        return self.unembed(self.features(h))


class ElfTransformer(nn.Module):
    """The whole ELF network (spec §1.2). Builds on the meta device; the RoPE tables are non-persistent buffers.

    Args:
        cfg: network sizes (``max_length``, ``latent_dim``, ``hidden_size``, ``depth``, ``num_heads``, …).
        generator: draws of the spec §1.4 initialisation; None uses the global RNG (as the reference does).

    Raises:
        RecipeError: ``hidden_size`` is not a multiple of ``num_heads`` or the head dim is odd.
    """

    def __init__(self, cfg: ElfConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        C, H = cfg.latent_dim, cfg.hidden_size
        if H % cfg.num_heads or (H // cfg.num_heads) % 2:
            raise RecipeError(
                f"model.hidden_size={H} / model.num_heads={cfg.num_heads}: expected an even head dim "
                "(hidden_size divisible by num_heads; RoPE rotates pairs)"
            )
        self.latent_dim, self.max_length = C, cfg.max_length
        self.head_dim = H // cfg.num_heads
        self.num_prefix = cfg.num_time_tokens + cfg.num_self_cond_cfg_tokens + cfg.num_mode_tokens
        self.self_cond_proj = nn.Linear(2 * C, C)  # [z, x̂] → C (spec §1.2 step 1)
        bottleneck = cfg.bottleneck_dim  # no bias, no activation in between (spec §1.2 step 2)
        self.text_proj = nn.Sequential(nn.Linear(C, bottleneck, bias=False), nn.Linear(bottleneck, H))
        self.time_embedder = ScalarEmbedder(H)
        self.time_tokens = nn.Parameter(torch.empty(1, cfg.num_time_tokens, H))
        self.sc_embedder = ScalarEmbedder(H)  # sc = self-conditioning guidance scale w, spec §3.2
        self.sc_tokens = nn.Parameter(torch.empty(1, cfg.num_self_cond_cfg_tokens, H))
        self.mode_tokens = nn.Parameter(torch.empty(1, cfg.num_mode_tokens, H))
        self.blocks = nn.ModuleList(Block(H, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.flow_head = FlowHead(H, C)
        self.decoder_head = DecoderHead(H, C, cfg.vocab_size)
        cos, sin = rope_tables(self.head_dim, cfg.max_length, self.num_prefix)
        self.register_buffer("rope_cos", cos, persistent=False)  # (P + L, hd)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights(generator)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise per spec §1.4 and rebuild the RoPE tables (call again after ``to_empty``).

        Linear weights xavier-uniform with zero bias; embedder MLPs and prefix tokens N(0, 0.02²); the flow head's
        linear zero (a fresh model predicts x̂ = 0); every RMSNorm weight one.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for embedder in (self.time_embedder, self.sc_embedder):
            for linear in (embedder.mlp[0], embedder.mlp[2]):
                nn.init.normal_(linear.weight, std=0.02, generator=generator)
        for tokens in (self.time_tokens, self.sc_tokens, self.mode_tokens):
            nn.init.normal_(tokens, std=0.02, generator=generator)
        nn.init.zeros_(self.flow_head.linear.weight)
        nn.init.zeros_(self.flow_head.linear.bias)
        cos, sin = rope_tables(self.head_dim, self.max_length, self.num_prefix, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        sc_scale: Tensor,
        decode_gate: Tensor | bool | None = None,
        attention_mask: Tensor | None = None,
        logit_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Run the network (spec §1.2).

        Args:
            x: (B, L, 2C) = [z, x̂_selfcond] (z first), or (B, L, C) to skip ``self_cond_proj``; L ≤ max_length.
            t: (B,) core time in [0, 1], fed raw to the time tokens.
            sc_scale: (B,) raw self-conditioning guidance scale w, fed to the SC-CFG tokens.
            decode_gate: None for a pure denoiser call (no logits); otherwise the mode-token gate — a bool, or a
                (B,) float per-row gate — and the decoder head runs (also for False).
            attention_mask: optional (B, L) key-padding mask, nonzero = valid; prefix tokens are always valid.
            logit_rows: optional (K,) int64 row indices: the decoder head runs on those rows only (training
                needs logits on decoder rows only; the vocabulary projection dominates the forward).

        Returns:
            The x-prediction (B, L, C) fp32, and logits (B, L, V) fp32 — (K, L, V) for ``logit_rows`` — or None
            when ``decode_gate`` is None.

        Raises:
            DataError: x has the wrong channel count or more than ``max_length`` positions.
        """
        h = self.trunk(x, t, sc_scale, decode_gate, attention_mask)  # (B, L, H)
        with full_precision(h.device):  # heads in fp32 (spec §1.2 precision)
            out = self.flow_head(h)  # (B, L, C)
            logits = None
            if decode_gate is not None:  # pre-final-norm h
                logits = self.decoder_head(h if logit_rows is None else h[logit_rows])  # (B or K, L, V)
        return out, logits

    def trunk(
        self,
        x: Tensor,
        t: Tensor,
        sc_scale: Tensor,
        decode_gate: Tensor | bool | None = None,
        attention_mask: Tensor | None = None,
        *,
        fold_inputs: bool = False,
    ) -> Tensor:
        """Run the network up to the heads (arguments as :meth:`forward`): the fp32 text states (B, L, H).

        ``fold_inputs`` multiplies ``self_cond_proj`` into the bias-free first ``text_proj`` layer (no activation
        lies between them): (B·L, 2C)·(2C, 128) instead of (2C, C) then (C, 128), 0.47 of the 4.3 G
        multiply-adds of an ELF width-256 forward at L 128. Only rounding changes (≈1e-7 relative on h); the
        sampling path uses it (the SDE and ODE+CFG rollout fixtures pass at 1e-5), training does not.
        """
        B, L, channels = x.shape
        if channels not in (self.latent_dim, 2 * self.latent_dim) or L > self.max_length:
            raise DataError(
                f"ElfTransformer input x: expected (B, L ≤ {self.max_length}, {self.latent_dim} or "
                f"{2 * self.latent_dim}), got {tuple(x.shape)}"
            )
        with full_precision(x.device):  # steps 1–4 in fp32 (spec §1.2 precision)
            x = x.float()
            if channels == 2 * self.latent_dim and fold_inputs:
                down = self.text_proj[0].weight  # (128, C)
                x = F.linear(x, down @ self.self_cond_proj.weight, down @ self.self_cond_proj.bias)  # (B, L, 128)
                h = self.text_proj[1](x)  # (B, L, H)
            else:
                if channels == 2 * self.latent_dim:
                    x = self.self_cond_proj(x)  # (B, L, C)
                h = self.text_proj(x)  # (B, L, H)
            time = self.time_tokens + self.time_embedder(t)[:, None]  # (B, 4, H)
            scale = self.sc_tokens + self.sc_embedder(sc_scale)[:, None]  # (B, 4, H)
        mode = (self.mode_tokens * self._gate(decode_gate)).expand(B, -1, -1)  # (B, 4, H); zeros unless decoding
        h = torch.cat([time, scale, mode, h], dim=1)  # (B, P + L, H)
        cos, sin = self.rope_cos[: h.shape[1]], self.rope_sin[: h.shape[1]]  # (P + L, hd)
        key_mask = None
        if attention_mask is not None:
            prefix = torch.ones(B, self.num_prefix, dtype=torch.bool, device=x.device)
            key_mask = torch.cat([prefix, attention_mask.bool()], dim=1)[:, None, None, :]  # (B, 1, 1, P + L)
        for block in self.blocks:
            h = block(h, cos, sin, key_mask)  # under the caller's autocast; the residual stays fp32
        return h[:, self.num_prefix :].float()  # (B, L, H), what both heads read

    def _gate(self, decode_gate: Tensor | bool | None) -> Tensor | float:
        """Return the mode-token multiplier: 0 without decoding, else the bool or the per-row (B, 1, 1) gate."""
        if decode_gate is None:
            return 0.0
        if isinstance(decode_gate, Tensor) and decode_gate.dim() > 0:
            return decode_gate.to(self.mode_tokens.dtype).view(-1, 1, 1)  # (B, 1, 1)
        return float(decode_gate)


class ElfDenoiser(Denoiser):
    """The ELF network as a Denoiser: raw output = x-prediction, no decoder head.

    Args:
        network: the shared :class:`ElfTransformer`.
    """

    def __init__(self, network: ElfTransformer) -> None:
        super().__init__()
        self.network = network

    def forward(self, z: Tensor, t: Tensor, cond: ElfCond, self_cond: Tensor | None = None) -> Tensor:
        """Return the x-prediction (B, L, C) for state z (B, L, C) at core times t (B,).

        ``self_cond`` (B, L, C) is the previous x̂ (zeros when None). The caller pins condition positions
        (``cond.restore``) in both halves; only ``cond.sc_scale`` is read here.
        """
        sc_input = torch.zeros_like(z) if self_cond is None else self_cond
        h = self.network.trunk(torch.cat([z, sc_input], dim=-1), t, cond.sc_scale, fold_inputs=True)  # (B, L, H)
        with full_precision(h.device):
            return self.network.flow_head(h)  # (B, L, C)


class ElfDecoder(Discretizer):
    """The ELF network in decode mode: [z, 0] at t = 1 with the mode tokens on (spec §4.3 step 4).

    Args:
        network: the shared :class:`ElfTransformer` (the same instance as the Denoiser's).
    """

    def __init__(self, network: ElfTransformer) -> None:
        super().__init__()
        self.network = network

    def forward(self, z: Tensor, cond: ElfCond) -> Tensor:
        """Return token logits (B, L, V) for the final state z (B, L, C)."""
        with full_precision(z.device):
            return self.network.decoder_head(self._states(z, cond))

    def greedy(self, z: Tensor, cond: ElfCond, *, screen: bool = True) -> Tensor:
        """Return the argmax ids (B, L) of :meth:`forward`'s logits (``greedy_linear``; ``screen=False``: exact)."""
        head = self.network.decoder_head
        with full_precision(z.device):
            features = head.features(self._states(z, cond))  # (B, L, C)
            return greedy_linear(features, head.unembed.weight, head.unembed.bias, screen=screen)

    def _states(self, z: Tensor, cond: ElfCond) -> Tensor:
        """Run the trunk in decode mode on [z, 0] at t = 1: the text states (B, L, H) the decoder head reads."""
        x = torch.cat([z, torch.zeros_like(z)], dim=-1)  # (B, L, 2C)
        t = torch.ones(z.shape[0], device=z.device)  # (B,)
        return self.network.trunk(x, t, cond.sc_scale, decode_gate=True, fold_inputs=True)
