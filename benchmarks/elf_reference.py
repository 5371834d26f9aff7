"""The ELF baseline of benchmarks/run.py: the reference implementation's way, on cdlm's modules and weights.

Not library code. It computes what ``lillian039/ELF`` (branch ``pytorch_elf``) computes, the way it computes it,
so that every speed-up in the table is measured against it in the same process:

- the network runs ``self_cond_proj`` then ``text_proj`` (no folding), RMSNorm as mean-of-squares, RoPE as
  the real-valued rotate-half form, SwiGLU's ``w12`` at its own width (no padding), and the decoder head on every
  row (training masks the CE of non-decoder rows afterwards);
- the frozen T5 encoder runs transformers' eager attention blocks with the (B, nh, L, L) bias;
- Muon runs Newton–Schulz on the wide matrix itself (``ns_side="direct"``);
- the final decode materialises all fp32 logits, checks ``isfinite(logits).all()`` and takes the argmax.

Outputs equal cdlm's within the fixture tolerances; run.py checks the token ids.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdlm_elf.embedder import T5Embedder
from cdlm_elf.model import ElfTransformer, full_precision


def _rms(norm: nn.Module, x: Tensor) -> Tensor:
    variance = x.float().pow(2).mean(dim=-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(variance + norm.eps))


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack((-odd, even), dim=-1).flatten(-2) * sin


class ReferenceNetwork(nn.Module):
    """An ELF network computed the reference's way from the weights of ``net`` (shared, not copied)."""

    def __init__(self, net: ElfTransformer) -> None:
        super().__init__()
        self.net = net
        self.flow_head, self.decoder_head = net.flow_head, net.decoder_head

    def trunk(self, x: Tensor, t: Tensor, sc_scale: Tensor, decode_gate=None, attention_mask=None, **_) -> Tensor:  # noqa: ANN001
        net = self.net
        B = x.shape[0]
        if x.shape[-1] == 2 * net.latent_dim:
            x = net.self_cond_proj(x)
        h = net.text_proj(x)
        time = net.time_tokens + net.time_embedder(t)[:, None]
        scale = net.sc_tokens + net.sc_embedder(sc_scale)[:, None]
        mode = (net.mode_tokens * net._gate(decode_gate)).expand(B, -1, -1)
        h = torch.cat([time, scale, mode, h], dim=1)
        cos, sin = net.rope_cos[: h.shape[1]], net.rope_sin[: h.shape[1]]
        for block in net.blocks:
            attn = block.attn
            q, k, v = attn.qkv(_rms(block.norm1, h)).view(B, h.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = _rope(_rms(attn.q_norm, q), cos, sin), _rope(_rms(attn.k_norm, k), cos, sin)
            out = F.scaled_dot_product_attention(q, k, v)
            h = h + attn.proj(out.transpose(1, 2).reshape(h.shape))
            a, b = block.mlp.w12(_rms(block.norm2, h)).chunk(2, dim=-1)  # the reference's SwiGLU, unpadded
            h = h + block.mlp.w3(F.silu(a) * b)
        return h[:, net.num_prefix :]

    def forward(self, x: Tensor, t: Tensor, sc_scale: Tensor, decode_gate=None, attention_mask=None, logit_rows=None):  # noqa: ANN001, ANN201
        h = self.trunk(x, t, sc_scale, decode_gate)
        logits = None if decode_gate is None else self.decoder_head(h)  # every row
        return self.flow_head(h), (logits if logit_rows is None or logits is None else logits[logit_rows])


def eager_embedder(embedder: T5Embedder) -> T5Embedder:
    """Return a view of ``embedder`` (same T5 weights) whose encoder runs transformers' eager T5 blocks."""

    def hidden(self: T5Embedder, ids: Tensor, mask3d: Tensor) -> Tensor:
        stack = self.t5.encoder
        h = self.t5.get_input_embeddings()(ids)
        L = ids.shape[1]
        bias = stack.block[0].layer[0].SelfAttention.compute_bias(L, L, device=ids.device)
        position_bias = bias + (1.0 - mask3d.to(h.dtype)[:, None]) * torch.finfo(h.dtype).min
        for block in stack.block:
            h = block(h, position_bias=position_bias)[0]
        return stack.final_layer_norm(h)

    view = copy.copy(embedder)
    view.hidden_states = types.MethodType(hidden, view)
    return view


def reference_greedy(logits: Tensor) -> Tensor:
    """The reference's temperature-0 selection over all fp32 logits (B, L, V) → (B, L)."""
    with full_precision(logits.device):
        if not torch.isfinite(logits).all():
            logits = torch.nan_to_num(logits, nan=0.0, posinf=1e4, neginf=-1e4)
        return logits.argmax(dim=-1)
