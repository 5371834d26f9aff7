"""The ``model:`` section of ELF recipes (ELF spec §1.1, §2, §3)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from cdlm.config import Section
from cdlm.training.distill import DistillConfig


class EncoderConfig(Section):
    """The frozen text encoder (the Embedder). Either a pretrained T5 or a randomly initialised one.

    ``pretrained`` is a hub id or a local ``save_pretrained`` directory loaded with ``from_pretrained``.
    When it is None, a T5 encoder of the given shape is built with random weights from ``seed``
    (the ELF paper's random-embedding ablation); it needs nothing downloaded.
    """

    pretrained: str | None = "t5-small"
    vocab_size: PositiveInt = 32128
    d_model: PositiveInt = 512
    num_layers: PositiveInt = 6
    num_heads: PositiveInt = 8
    d_kv: PositiveInt = 64
    d_ff: PositiveInt = 2048
    seed: int = 0


class ElfConfig(Section):
    """ELF network, embedder and objective hyper-parameters. Defaults are ELF-B on OpenWebText."""

    # network (spec §1.1)
    max_length: PositiveInt = Field(1024, description="L; the input length must equal it (RoPE tables, spec §1.2)")
    latent_dim: PositiveInt = Field(512, description="C = encoder d_model (text_encoder_dim)")
    hidden_size: PositiveInt = 768
    depth: PositiveInt = 12
    num_heads: PositiveInt = 12
    mlp_ratio: PositiveFloat = 4.0
    bottleneck_dim: PositiveInt = 128
    num_time_tokens: PositiveInt = 4
    num_self_cond_cfg_tokens: PositiveInt = 4
    num_mode_tokens: PositiveInt = 4
    vocab_size: PositiveInt = Field(32100, description="V of the decoder head")
    pad_id: int = Field(0, ge=0, description="tokenizer pad id (T5: 0); generation pads after EOS with it")
    eos_id: int = Field(1, ge=0, description="tokenizer EOS id (T5: 1)")
    # embedder (spec §2)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    latent_mean: float = 0.0
    latent_std: PositiveFloat = 0.2
    # objective (spec §3)
    noise_scale: PositiveFloat = Field(2.0, description="s in z_t = t·x + (1 − t)·s·ε")
    t_eps: PositiveFloat = Field(0.05, description="clamp of 1 − t in v = (x − z)/max(1 − t, t_eps)")
    time_schedule: Literal["logit_normal", "uniform"] = "logit_normal"
    p_mean: float = -1.5
    p_std: PositiveFloat = 0.8
    decoder_prob: float = Field(0.2, ge=0.0, le=1.0)
    decoder_p_mean: float = 0.8
    decoder_p_std: PositiveFloat = 0.8
    decoder_noise_scale: NonNegativeFloat = 5.0
    self_cond_prob: float = Field(0.5, ge=0.0, le=1.0)
    self_cond_cfg_min: NonNegativeFloat = 0.5
    self_cond_cfg_max: NonNegativeFloat = 5.0
    label_drop_prob: float = Field(0.0, ge=0.0, le=1.0)
    # progressive distillation (spec §8): set to train this network as a student of a frozen teacher
    distill: DistillConfig | None = None
