"""The ``model:`` and ``sample:`` sections of Cola recipes and their cross-section rules.

The two networks' configs are read as an official ``config.json`` holds them (Cola spec §1.2): every field of the
reference ``ColaTextVAEConfig`` / ``ColaDiTConfig`` is here with the reference's class default; a checkpoint's
``config.json`` overrides them. Unknown fields fail, except the bookkeeping keys that Hugging Face's
``save_pretrained`` writes (:data:`HF_BOOKKEEPING_KEYS`), which are accepted and dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import (
    AliasChoices,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from cdlm.config import RunConfig, SampleConfig, Section
from cdlm.errors import CheckpointError
from cdlm.training.distill import DistillConfig

Config = TypeVar("Config", bound="_HfConfig")
HF_BOOKKEEPING_KEYS = frozenset({"architectures", "model_type", "transformers_version", "torch_dtype", "dtype"})
"""Keys of an HF ``config.json`` that describe the file, not the network (spec §1.2)."""


class _HfConfig(Section):
    """A config that also accepts the HF bookkeeping keys of a ``config.json`` (checking ``model_type``)."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _drop_bookkeeping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        found = raw.get("model_type", cls.model_type)
        if found != cls.model_type:
            raise ValueError(f"model_type: expected {cls.model_type!r}, got {found!r} (another model's config.json?)")
        return {key: value for key, value in raw.items() if key not in HF_BOOKKEEPING_KEYS}

    def to_hf_dict(self) -> dict[str, Any]:
        """Return the ``config.json`` content the reference's ``from_pretrained`` reads.

        Unset SFT keys are left out: the reference's chat script tests their presence (``getattr`` default).
        """
        fields = {k: v for k, v in self.model_dump().items() if not (k.startswith("sft_") and v is None)}
        return {"architectures": [self.architecture], "model_type": self.model_type, **fields}


class ColaDitConfig(_HfConfig):
    """``ColaDiTConfig``: the block-causal flow-matching prior over latents (spec §1.2, §3)."""

    model_type: ClassVar[str] = "cola_dit"
    architecture: ClassVar[str] = "ColaDiTModel"

    txt_in_channels: PositiveInt = Field(16, description="latent channels in (= VAE latent_dim)")
    txt_out_channels: PositiveInt = Field(16, description="velocity channels out")
    txt_dim: PositiveInt = Field(2048, description="trunk width H")
    emb_dim: PositiveInt = Field(2048, description="timestep-embedding width; must equal txt_dim")
    heads: PositiveInt = 16
    head_dim: PositiveInt = 128
    expand_ratio: PositiveInt = Field(4, description="MLP hidden = expand_ratio · txt_dim")
    num_layers: PositiveInt = 24
    norm_eps: PositiveFloat = Field(1e-5, description="eps of every DiT LayerNorm, qk-norm included")
    qk_bias: bool = Field(False, description="bias of proj_qkv and proj_out")
    patch_size: Literal[1] = Field(1, description="only 1: the reference DiT forward fails for 2 (spec §15)")
    rope_dim: PositiveInt = Field(96, description="rotated channels per head (interleaved RoPE, θ 1e4)")
    block_size: PositiveInt = Field(4, description="bs of the DiT block-causal mask; the release uses 16")
    # written by the community SFT script (spec §1.2, §9.2); read by the generation pipeline
    sft_chat_format: Literal["text", "chatml"] | None = None
    sft_pad_with_stop: bool | None = None
    sft_stop_token_id: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _check_shapes(self) -> ColaDitConfig:
        if self.emb_dim != self.txt_dim:
            raise ValueError(f"emb_dim must equal txt_dim (the AdaLN input is txt_dim wide), got {self.emb_dim}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope_dim must be even and <= head_dim {self.head_dim}, got {self.rope_dim}")
        return self


class ColaVaeConfig(_HfConfig):
    """``ColaTextVAEConfig``: tokens ↔ latents, ``patch_size`` tokens per latent (spec §1.2, §2)."""

    model_type: ClassVar[str] = "cola_text_vae"
    architecture: ClassVar[str] = "ColaTextVAEModel"

    vocab_size: PositiveInt = Field(100278, description="V of the decoder head; wte has V + 1 rows")
    encoder_num_blocks: PositiveInt = 4
    decoder_num_blocks: PositiveInt = 4
    dim: PositiveInt = 1536
    ffn_dim: PositiveInt = 6144
    latent_dim: PositiveInt = Field(16, description="d, latent channels")
    patch_size: PositiveInt = Field(1, description="ps, tokens per latent")
    num_heads: PositiveInt = 12
    shared_heads_kv: Literal[1] = Field(1, description="only 1: other values break the reference head reshape")
    encoder_last_ln: bool = Field(True, description="parameter-free LayerNorm on the posterior mean")
    layer_norm_type: Literal["layer_norm"] = "layer_norm"
    layer_norm_eps: PositiveFloat = 1e-6
    layer_norm_affine: bool = Field(True, description="affine of norm_attn only")
    post_norm: bool = Field(True, description="the reference's non-standard block (spec §2.3, H2)")
    qk_bias: bool = Field(False, description="bias of qkv_proj")
    qk_norm: bool = Field(True, description="LayerNorm over the full width on q and k (H3)")
    qk_norm_affine: bool = True
    clip_qkv: PositiveFloat | None = Field(None, description="clamp of the qkv projection to [-c, c]")
    rope_theta: PositiveFloat = 500000.0
    rope_full_precision: bool = Field(True, description="RoPE in fp32 (cdlm always computes RoPE in fp32)")
    bias: bool = Field(True, description="bias of attn_out_proj, ffn, encoder final_layer, decoder in/final layers")
    dropout: NonNegativeFloat = Field(0.0, le=0.0, description="only 0: cdlm never trains with VAE dropout")
    attn_dropout: NonNegativeFloat = Field(0.0, le=0.0, description="only 0: cdlm never trains with VAE dropout")
    act: Literal["swiglu", "silu", "gelu"] = Field("swiglu", description="swiglu chunk order is [value, gate]")
    causal: bool = Field(False, description="stored but unused by the reference forward")
    block_causal: bool = Field(True, description="False means no attention mask at all (spec §1.2)")
    block_size: PositiveInt = Field(4, description="bs of the VAE block-causal mask (H5)")
    init_fn: Literal["normal", "mitchell", "full_megatron"] = Field(
        "normal", description="recorded only: the reference's HF init uses init_std everywhere (spec §3.4)"
    )
    init_std: PositiveFloat = 0.02
    init_cutoff_factor: PositiveFloat | None = Field(3.0, description="truncation at ±factor·init_std")
    use_variation: bool = Field(True, description="Gaussian posterior with 2·latent_dim outputs")
    use_emb: bool = Field(True, description="stored but unused by the reference")
    scaling_factor: float = Field(1.0, description="DiT latents are (z − shifting_factor)·scaling_factor")
    shifting_factor: float = 0.0

    @model_validator(mode="after")
    def _check_shapes(self) -> ColaVaeConfig:
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into num_heads {self.num_heads} heads of even width")
        if self.act == "swiglu" and self.ffn_dim % 2:
            raise ValueError(f"ffn_dim must be even for swiglu, got {self.ffn_dim}")
        return self


def _read_config(directory: str | Path, cls: type[Config], kind: str) -> Config:
    """Read and validate ``directory/config.json`` as ``cls``; absent fields keep the reference defaults.

    Raises:
        CheckpointError: the file is missing or not JSON, or a field is unknown or invalid (each one named).
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; a Cola {kind} checkpoint directory holds config.json and model.safetensors "
            "(or model.safetensors.index.json and its shards)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        lines = [f"{path}: {_describe(e)}" for e in err.errors()]
        raise CheckpointError("\n".join(lines)) from None


def _describe(err: Any) -> str:
    """Render one pydantic error as ``field: problem, got value``."""
    field = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{field}: unknown field for this Cola config"
    if err["type"] == "value_error":  # a model-level check; its message names the fields
        return str(err["ctx"]["error"])
    found = "" if err["type"] == "missing" else f", got {err.get('input')!r}"
    return f"{field}: {err['msg'].lower()}{found}"


def read_dit_config(directory: str | Path) -> ColaDitConfig:
    """Read a ``ColaDiTModel`` directory's ``config.json``; a CheckpointError names the file and each bad field."""
    return _read_config(directory, ColaDitConfig, "DiT")


def read_vae_config(directory: str | Path) -> ColaVaeConfig:
    """Read a ``ColaTextVAEModel`` directory's ``config.json``; a CheckpointError names the file and each bad field."""
    return _read_config(directory, ColaVaeConfig, "VAE")


class ColaDistillConfig(DistillConfig):
    """A Cola distillation round (:mod:`cdlm_cola.distill`): the core's settings plus the guidance folded in."""

    guidance: float = Field(
        1.0,
        ge=0.0,
        description="classifier-free guidance scale of the teacher, folded into the student, which then samples "
        "with sample.guidance=1 (1: an unguided teacher)",
    )


class ColaConfig(Section):
    """The ``model:`` section of Cola recipes: both networks, where their weights come from, and the objective.

    ``vae`` / ``dit`` give the network shapes. ``pretrained_vae`` / ``pretrained_dit`` name official Hugging Face
    directories (``config.json`` + ``model.safetensors`` or a sharded index); when set, the shapes are read from
    their ``config.json`` and must agree with ``vae`` / ``dit`` if those are given too.
    """

    vae: ColaVaeConfig | None = None
    dit: ColaDitConfig | None = None
    pretrained_vae: str | None = None
    pretrained_dit: str | None = None
    stage: Literal["vae", "joint", "dit"] = Field(
        "joint", description="vae: Stage 1 (VAE only); joint: Stage 2 (VAE + DiT); dit: DiT only, frozen VAE"
    )
    # token ids (OLMo 2 release values; spec §8.1)
    pad_id: NonNegativeInt = 100277
    eos_id: NonNegativeInt = 100257
    im_end_id: NonNegativeInt | None = 100265
    # generation (spec §5, §6)
    time_scale: PositiveFloat = Field(1000.0, description="T: the DiT reads t·T")
    per_sample_noise_seed: int | None = Field(
        None, description="COLA_INFER_PER_SAMPLE_NOISE_SEED of the reference (its benchmark uses 66)"
    )
    max_length: PositiveInt = Field(
        4096,
        description="the longest prompt + generation sampling accepts, in tokens: RoPE sets no hard limit, but the "
        "KV caches and the time grow with it and the release trained on 512-token rows",
    )
    # flow-matching training (spec §5, §9.2)
    time_distribution: Literal["logit_normal", "uniform"] = "logit_normal"
    t_loc: float = 0.0
    t_scale: PositiveFloat = 1.0
    block_sizes: list[PositiveInt] | None = Field(
        None, description="per-sample training block sizes; None = dit.block_size"
    )
    block_size_probs: list[NonNegativeFloat] | None = Field(None, description="weights of block_sizes; None = uniform")
    prompt_block_prob: float = Field(0.0, ge=0.0, le=1.0)
    vae_mode: Literal["sample", "mode"] = "sample"
    loss_mode: Literal["all_token", "sft"] = Field(
        "all_token", description="sft: condition (prompt) latents before a response stay clean and are not trained"
    )
    boundary_mode: Literal["token", "block"] = Field(
        "token", description="how a prompt latent after a response latent of its block is hidden (spec §9.2)"
    )
    padding_loss: Literal["masked", "trained"] = Field(
        "masked",
        description="flow-matching loss on padding latents (spec §9.2): masked, as cola_pretrain.py and "
        "cola_sft.py do; trained, as cola_cpt.py does (its loss mask is all ones: the pad_id padding of a row to a "
        "block multiple and the data's fill are noised and trained like real latents)",
    )
    # loss weights (spec §9.1; the paper's values are not public: documented defaults)
    recon_weight: NonNegativeFloat = 1.0
    kl_weight: NonNegativeFloat = 1e-3
    mask_weight: NonNegativeFloat = 1.0
    mask_ratio: float = Field(0.15, ge=0.0, le=1.0)
    fm_weight: NonNegativeFloat = 1.0
    ref_kl_weight: NonNegativeFloat = 0.1
    # progressive distillation of the per-block transport (cdlm_cola.distill): set to train the DiT as a student
    distill: ColaDistillConfig | None = None

    @model_validator(mode="after")
    def _check_block_size_probs(self) -> ColaConfig:
        if self.block_size_probs is None:
            return self
        n_sizes = None if self.block_sizes is None else len(self.block_sizes)
        if n_sizes != len(self.block_size_probs) or sum(self.block_size_probs) <= 0:
            raise ValueError(
                f"block_size_probs: expected one probability per entry of block_sizes ({self.block_sizes}), "
                f"not all zero; got {self.block_size_probs}"
            )
        return self


class ColaSampleConfig(SampleConfig):
    """Cola's sampling settings, with the reference's defaults (``generate_task_repaint_inference``, Cola spec §5–7).

    Generation integrates each block on a uniform grid, with classifier-free guidance, and selects tokens with a
    repetition penalty over the previous blocks; ``max_new_tokens`` counts whole blocks (Cola spec §6.1 step 8).
    """

    batch_size: PositiveInt = Field(20, description="prompts per batch (the reference CLI's --batch_size)")
    steps: PositiveInt = Field(16, description="solver steps per block (the reference's timestep_num)")
    sampler: Literal["euler", "heun", "midpoint", "dpm2m"] = Field(
        "euler",
        description="euler (the reference's); heun / midpoint (2 evaluations per step); dpm2m (second-order "
        "multistep, 1 evaluation per step)",
    )
    grid: Literal["uniform"] = Field("uniform", description="the reference's uniform grid, T → 0 (Cola spec §5)")
    guidance: float = Field(
        7.0,
        validation_alias=AliasChoices("guidance", "cfg"),  # cfg: its name in run configs saved before the rename
        description="classifier-free guidance scale (the reference's guidance_scale, Cola spec §5); 1 disables it",
    )
    max_new_tokens: PositiveInt = Field(
        32, description="tokens to generate per prompt, rounded up to whole blocks (Cola spec §6.1 step 7.7)"
    )
    top_k: NonNegativeInt = Field(50, description="keep the k most likely tokens; 0 keeps all (Cola spec §7)")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="nucleus filtering; 1 keeps all (Cola spec §7)")
    repetition_penalty: PositiveFloat = Field(
        1.1, description="on the ids of previous blocks, applied even when greedy (Cola spec §7); 1 disables it"
    )


def check_run(config: RunConfig) -> list[tuple[tuple[str, ...], str]]:
    """Return the cross-section problems of a Cola run config, each as (fields involved, problem).

    Checked where the recipe states the shapes inline (a pretrained directory's ``config.json`` is read when the
    method is built): a trained BPE within the VAE vocabulary, training blocks that fit a row, and a generation
    budget within ``model.max_length``.
    """
    cfg: ColaConfig = config.model
    problems = []
    sample: ColaSampleConfig = config.sample
    if cfg.distill is not None and cfg.distill.guidance != 1.0 and sample.guidance != 1.0:
        problems.append(
            (
                ("model.distill.guidance", "sample.guidance"),
                f"the student learns the teacher guided at {cfg.distill.guidance}, so sampling it with guidance "
                f"{sample.guidance} would guide twice; set sample.guidance=1",
            )
        )
    if sample.max_new_tokens > cfg.max_length:
        problems.append(
            (
                ("sample.max_new_tokens", "model.max_length"),
                f"{sample.max_new_tokens} new tokens exceed model.max_length {cfg.max_length}, the longest prompt "
                "plus generation sampling accepts; ask for fewer tokens (or raise model.max_length)",
            )
        )
    vae = cfg.vae if cfg.pretrained_vae is None else None
    if vae is not None and config.data.tokenizer == "bpe" and config.data.vocab_size > vae.vocab_size:
        problems.append(
            (
                ("data.vocab_size", "model.vae.vocab_size"),
                f"{config.data.vocab_size} tokens for a trained BPE exceed model.vae.vocab_size {vae.vocab_size}, "
                f"which the VAE reads; set data.vocab_size to at most {vae.vocab_size} (or raise the VAE's)",
            )
        )
    dit = cfg.dit if cfg.pretrained_dit is None else None
    sizes = cfg.block_sizes or ([dit.block_size] if dit is not None else [])
    patch_size = vae.patch_size if vae is not None else 1
    too_big = [bs for bs in sizes if bs * patch_size > config.data.seq_len]
    if cfg.stage != "vae" and too_big:
        field = "model.block_sizes" if cfg.block_sizes else "model.dit.block_size"
        problems.append(
            (
                (field, "data.seq_len"),
                f"training blocks of {too_big} latents do not fit a row of data.seq_len {config.data.seq_len} "
                f"tokens ({patch_size} per latent); use blocks of at most {config.data.seq_len // patch_size} "
                "latents (or longer rows)",
            )
        )
    return problems
