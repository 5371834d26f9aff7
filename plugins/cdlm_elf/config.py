"""The ``model:`` and ``sample:`` sections of ELF recipes (ELF spec §1–4) and the rules between sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from cdlm.config import RunConfig, Section
from cdlm.pipeline import FlowSampleConfig
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
    mlm_mask_prob: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="give the encoder a masked-LM head, trained in a first recipe stage (model.stage: encoder) when "
        "no pretrained encoder is at hand: this share of tokens is replaced by [MASK], the last encoder id",
    )


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
    stage: Literal["flow", "encoder"] = Field(
        "flow",
        description="flow: train the network on the frozen encoder (ELF); encoder: pretrain the encoder by masked LM "
        "(needs encoder.mlm_mask_prob; not in the paper, which starts from a pretrained T5)",
    )


class ElfSampleConfig(FlowSampleConfig):
    """ELF's sampling settings: the core flow sampler's, with ELF-B's headline defaults, and SC-CFG (ELF spec §4).

    Defaults: 32-step SDE, γ = 1.5, SC-CFG w = 3, logit-normal grid (ELF spec §4.4); ``cfg`` (classifier-free
    guidance on the source) is for seq2seq models.
    """

    sampler: Literal["euler", "heun", "midpoint", "dpm2m", "sde"] = Field(
        "sde", description="the solver (see FlowSampleConfig); ELF's is sde, the back-off sampler (ELF spec §4.3)"
    )
    grid: Literal["uniform", "logit_normal", "logit_normal_quantiles", "shifted"] = Field(
        "logit_normal", description="the time grid (see FlowSampleConfig); ELF's is logit_normal (ELF spec §4.1)"
    )
    churn: NonNegativeFloat = Field(1.5, description="SDE γ: back-off per unit time (sampler: sde, ELF spec §4.3)")
    self_cond_scale: float = Field(3.0, description="self-conditioning guidance scale w (SC-CFG, ELF spec §3.2)")


def check_run(config: RunConfig) -> list[tuple[tuple[str, ...], str]]:
    """Return the cross-section problems of an ELF run config, each as (fields involved, problem).

    Rows of exactly ``model.max_length`` tokens (RoPE tables, spec §1.2); a trained BPE and the token ids within
    the vocabularies of the decoder head and, for a random encoder, of its embedding.
    """
    cfg: ElfConfig = config.model
    problems = []
    if config.data.seq_len != cfg.max_length:
        problems.append(
            (
                ("data.seq_len", "model.max_length"),
                f"{config.data.seq_len} differs from model.max_length {cfg.max_length}; ELF reads rows of "
                "exactly model.max_length tokens: set both to the same value",
            )
        )
    vocabularies = {"model.vocab_size": cfg.vocab_size}
    if cfg.encoder.pretrained is None:
        vocabularies["model.encoder.vocab_size"] = cfg.encoder.vocab_size
    for field, size in vocabularies.items():
        if config.data.tokenizer == "bpe" and config.data.vocab_size > size:
            problems.append(
                (
                    ("data.vocab_size", field),
                    f"{config.data.vocab_size} tokens for a trained BPE exceed {field} {size}, which the model "
                    f"reads; set data.vocab_size to at most {size} (or raise {field})",
                )
            )
    if cfg.stage == "encoder" and cfg.encoder.mlm_mask_prob is None:
        problems.append(
            (("model.stage", "model.encoder.mlm_mask_prob"), "encoder needs model.encoder.mlm_mask_prob (e.g. 0.15)")
        )
    if cfg.encoder.mlm_mask_prob is not None and cfg.encoder.vocab_size <= cfg.vocab_size:
        problems.append(
            (
                ("model.encoder.vocab_size", "model.vocab_size"),
                f"{cfg.encoder.vocab_size}: a masked-LM encoder needs one id past the model.vocab_size "
                f"{cfg.vocab_size} tokens for [MASK]; set it to {cfg.vocab_size + 1}",
            )
        )
    for name in ("pad_id", "eos_id"):
        value = getattr(cfg, name)
        if value >= cfg.vocab_size:
            problems.append(
                (
                    (f"model.{name}", "model.vocab_size"),
                    f"{value} is outside the vocabulary [0, {cfg.vocab_size}); set it to the tokenizer's id",
                )
            )
    return problems
