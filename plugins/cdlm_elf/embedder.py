"""ELF's Embedder: a frozen T5 encoder with a 3-D attention mask, latents normalised by (h − mean)/std (spec §2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from cdlm.errors import CheckpointError
from cdlm.interfaces import Embedder, TokenBatch
from cdlm_elf.config import ElfConfig, EncoderConfig


def encoder_mask(mask: Tensor, cond_mask: Tensor, drop: Tensor | None = None) -> Tensor:
    """Build the encoder self-attention mask (spec §2): condition tokens see only the condition, the rest see all.

    ``M[i, j] = (cond_i ∧ cond_j) ∨ (¬cond_i ∧ valid_j)``. Rows with ``drop`` (label dropout, spec §3.3 step 1)
    also hide the condition from non-condition tokens: ``M[i, j] ∧= ¬(drop ∧ ¬cond_i ∧ cond_j)``.

    Args:
        mask: (B, L) bool, True on real tokens.
        cond_mask: (B, L) bool, True on condition positions.
        drop: optional (B,) bool, True on label-dropped rows.

    Returns:
        (B, L, L) bool, True where query i may attend to key j.
    """
    cond_i, cond_j, valid_j = cond_mask[:, :, None], cond_mask[:, None, :], mask[:, None, :]
    allowed = (cond_i & cond_j) | (~cond_i & valid_j)  # (B, L, L)
    if drop is not None:
        allowed = allowed & ~(drop[:, None, None] & ~cond_i & cond_j)  # (B, L, L)
    return allowed


class T5Embedder(Embedder):
    """A frozen ``transformers.T5EncoderModel``: pretrained (``encoder.pretrained``) or random from ``encoder.seed``.

    With ``encoder.mlm_mask_prob`` it also has ``mlm_head``, a linear map from the encoder's output to
    ``model.vocab_size`` token logits: ELF's ``stage: encoder`` trains the two by masked LM, then later stages
    freeze them (:class:`~cdlm_elf.encoder_pretraining.MaskedLMObjective`).

    Args:
        cfg: the ELF model config; reads ``encoder``, ``latent_dim`` (must equal d_model), ``latent_mean``
            and ``latent_std``.

    Raises:
        CheckpointError: the pretrained encoder cannot be loaded, or its d_model differs from ``latent_dim``.
    """

    def __init__(self, cfg: ElfConfig) -> None:
        super().__init__()
        self.t5 = _build_t5(cfg.encoder)
        d_model = self.t5.config.d_model
        if d_model != cfg.latent_dim:
            raise CheckpointError(
                f"model.encoder (pretrained={cfg.encoder.pretrained!r}): d_model is {d_model}, but "
                f"model.latent_dim is {cfg.latent_dim}; set model.latent_dim: {d_model}"
            )
        self.t5.requires_grad_(False)
        self.t5.eval()
        self.latent_mean, self.latent_std = cfg.latent_mean, cfg.latent_std
        self.mlm_head: nn.Linear | None = None
        if cfg.encoder.mlm_mask_prob is not None:
            with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global RNG; keep it untouched
                torch.manual_seed(cfg.encoder.seed + 1)
                self.mlm_head = nn.Linear(d_model, cfg.vocab_size)
            self.mlm_head.requires_grad_(False)

    def train(self, mode: bool = True) -> T5Embedder:
        """Keep the frozen encoder in eval mode (no dropout) whatever the surrounding module's mode."""
        super().train(mode)
        self.t5.eval()
        return self

    def forward(self, batch: TokenBatch) -> Tensor:
        """Return the normalised latents x0 (B, L, C) fp32 of ``batch`` under the spec §2 encoder mask."""
        return self.encode(batch.ids, encoder_mask(batch.mask, batch.cond_mask))

    @torch.no_grad()
    def encode(self, ids: Tensor, mask3d: Tensor) -> Tensor:
        """Encode token ids under an explicit 3-D mask and normalise: ``(last_hidden_state − mean) / std``.

        Args:
            ids: (B, L) int64 token ids.
            mask3d: (B, L, L) bool or 0/1 float, nonzero where query i may attend to key j.

        Returns:
            (B, L, C) fp32 latents.
        """
        hidden = self.hidden_states(ids, mask3d)  # (B, L, C)
        return (hidden.float() - self.latent_mean) / self.latent_std

    def hidden_states(self, ids: Tensor, mask3d: Tensor) -> Tensor:
        """Return the encoder's last hidden state (B, L, C) of ids (B, L) under a 3-D mask (B, L, L), unnormalised.

        Differentiable: masked-LM pretraining calls it with the encoder trainable.
        """
        # transformers >= 4.45 T5Stack takes only 2-D masks, so the 3-D mask is folded into the relative-position
        # bias that every layer shares, as transformers 4.44 did: bias + (1 − M)·finfo.min. The blocks are run
        # here, attention through SDPA (fused on CPU and GPU) instead of T5's eager softmax(q·kᵀ + bias)·v.
        stack = self.t5.encoder
        h = self.t5.get_input_embeddings()(ids)  # (B, L, C)
        L = ids.shape[1]
        bias = stack.block[0].layer[0].SelfAttention.compute_bias(L, L, device=ids.device)  # (1, nh, L, L)
        additive = (1.0 - mask3d.to(h.dtype)[:, None]) * torch.finfo(h.dtype).min  # (B, 1, L, L)
        position_bias = bias + additive  # (B, nh, L, L)
        for block in stack.block:
            attention, feed_forward = block.layer[0], block.layer[-1]
            h = h + _t5_attention(attention.SelfAttention, attention.layer_norm(h), position_bias)
            h = feed_forward(h)  # h + DenseReluDense(layer_norm(h))
        return stack.final_layer_norm(h)  # dropout is inactive: the encoder stays in eval mode


def _t5_attention(attn: T5Attention, x: Tensor, position_bias: Tensor) -> Tensor:
    """T5 self-attention of x (B, L, C): unscaled scores plus ``position_bias`` (B, nh, L, L), through SDPA.

    Equal to ``T5Attention`` up to rounding (≤ 1e-6 on the fixtures' latents; tests/plugins/elf/test_embedder.py).
    """
    B, L, _ = x.shape
    q, k, v = (
        proj(x).view(B, L, attn.n_heads, attn.key_value_proj_dim).transpose(1, 2) for proj in (attn.q, attn.k, attn.v)
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias.to(q.dtype), scale=1.0)  # (B, nh, L, dk)
    return attn.o(out.transpose(1, 2).reshape(B, L, attn.inner_dim))  # (B, L, C)


def _build_t5(enc: EncoderConfig) -> T5EncoderModel:
    """Load ``enc.pretrained``, or build a random T5 encoder of the configured shape from ``enc.seed``.

    On the meta device (parameter counting, no allocation) only the configured shape is built, never loaded.
    """
    if enc.pretrained is None or torch.get_default_device().type == "meta":
        config = T5Config(
            vocab_size=enc.vocab_size,
            d_model=enc.d_model,
            d_kv=enc.d_kv,
            d_ff=enc.d_ff,
            num_layers=enc.num_layers,
            num_heads=enc.num_heads,
            feed_forward_proj="relu",
            dropout_rate=0.0,
            use_cache=False,
        )
        with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG; keep it untouched
            torch.manual_seed(enc.seed)
            return T5EncoderModel(config)
    try:
        return T5EncoderModel.from_pretrained(enc.pretrained).float()  # fp32 whatever the saved dtype (spec §2)
    except (OSError, ValueError) as err:  # missing directory or files, unknown or uncached hub id, invalid id
        raise CheckpointError(
            f"model.encoder.pretrained={enc.pretrained!r}: cannot load a T5 encoder ({err}). Expected a local "
            "directory written by T5EncoderModel.save_pretrained (config.json + model.safetensors) or a hub id "
            "already in the local cache (offline runs set HF_HUB_OFFLINE=1); set model.encoder.pretrained: null "
            "for a randomly initialised encoder"
        ) from err
