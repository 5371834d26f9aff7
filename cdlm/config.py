"""Typed run configuration: one validated pydantic model per run, built from a YAML recipe plus overrides.

A recipe has the sections ``data`` and ``train`` (validated here), ``model`` (validated by the plugin's
``MethodSpec.config_cls``) and ``sample`` (the plugin's ``MethodSpec.sample_config_cls``, a subclass of
:class:`SampleConfig`). Unknown fields fail everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SerializeAsAny,
)


class Section(BaseModel):
    """Base of every config section: unknown fields are errors, floats are finite and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    """Where the text comes from and how it becomes fixed-length token rows."""

    source: str = Field(
        "builtin:pydoc",
        description="'builtin:pydoc' (CPython's bundled documentation text, always present), a local file or "
        "directory (.txt, .jsonl/.json, .parquet, .arrow), or a Hugging Face hub dataset id",
    )
    subset: str | None = Field(None, description="dataset configuration name for hub datasets")
    split: str = "train"
    text_field: str = Field(
        "text",
        description="column holding the text (the target for seq2seq); a source without it but with an 'input_ids' "
        "column is read as already tokenised by data.tokenizer",
    )
    source_field: str | None = Field(None, description="column holding the condition text; set for seq2seq")
    tokenizer: str = Field(
        "bpe", description="'bpe' trains a byte-level BPE on the corpus (cached in the run dir); else a hub id or path"
    )
    vocab_size: PositiveInt = Field(512, description="vocabulary size of a trained 'bpe' tokenizer")
    seq_len: PositiveInt = Field(128, description="tokens per row (ELF: must equal model.max_length)")
    max_source_len: NonNegativeInt = Field(0, description="seq2seq: condition tokens kept per row")
    pad_token: Literal["pad", "eos"] = Field("pad", description="pad rows with the pad id (masked) or EOS (trained)")
    max_rows: PositiveInt | None = Field(None, description="keep at most this many source rows (quick runs)")
    holdout: list[str] = Field(default_factory=list, description="file names under a local directory to leave out")
    streaming: bool = Field(
        False,
        description="read and tokenise the source on the fly, in file order, without a cache (for corpora too big "
        "to cache); the loader position (document and token offset) is saved in checkpoints",
    )
    num_proc: PositiveInt | None = Field(
        None,
        description="processes that tokenise and pack into the cache; default: up to 8 (one per core) for sources "
        "of 50,000 rows or more, else 1",
    )
    cache_dir: str | None = Field(
        None,
        description="where tokenised rows are cached (Arrow, memory-mapped, reused by later runs); default: "
        "'cdlm-rows' under the datasets cache (HF_DATASETS_CACHE)",
    )


class TrainConfig(Section):
    """Optimisation, precision, logging and checkpointing."""

    steps: PositiveInt = Field(1000, description="optimizer steps")
    batch_size: PositiveInt = Field(32, description="rows per micro-batch per process")
    grad_accum: PositiveInt = 1
    optimizer: Literal["muon", "adamw"] = "muon"
    lr: PositiveFloat = 2e-3
    warmup_steps: NonNegativeInt = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.0
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    clip_grad_norm: PositiveFloat | None = 1.0
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    log_every: PositiveInt = 10
    save_every: PositiveInt = 500
    keep_last: PositiveInt = 3
    trackers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    init_from: str | None = Field(
        None,
        description="what initialises a fresh run's weights: anything cdlm sample --checkpoint reads (a run, a "
        "checkpoint, a released checkpoint, a hub id); stages default to the previous stage",
    )
    init_weights: Literal["raw", "ema"] = Field(
        "raw", description="which weights of init_from a fresh run starts from (progressive distillation: ema)"
    )
    max_minutes: PositiveFloat | None = Field(
        None,
        description="wall-clock limit of one invocation: save a checkpoint and stop after this many minutes "
        "(the LR schedule still plans for train.steps, so a rerun continues)",
    )
    num_threads: NonNegativeInt = Field(
        1, description="torch CPU threads (torch.set_num_threads); 0 keeps torch's default of one per core"
    )


class SampleConfig(Section):
    """Sampling settings every method uses; a plugin subclasses it with its own (``MethodSpec.sample_config_cls``).

    A method's subclass adds the settings only it reads (ELF's SDE churn, Cola's guidance and token budget) and
    may change the defaults here to its reference's; a recipe's ``sample:`` section is validated with it, so a
    setting the method does not use is an unknown field.
    """

    num_samples: PositiveInt = Field(4, description="samples without prompts (with prompts: one per prompt)")
    batch_size: PositiveInt = Field(16, description="samples generated together")
    steps: PositiveInt = Field(32, description="solver steps")
    temperature: NonNegativeFloat = Field(0.0, description="token selection temperature; 0 means argmax")
    top_k: NonNegativeInt = Field(0, description="keep the k most likely tokens; 0 keeps all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus filtering; 1 keeps all")
    use_ema: bool = Field(True, description="sample with the EMA weights (false: the raw ones)")
    seed: int = Field(0, description="seed of the sampling generator")
    num_threads: NonNegativeInt = Field(
        1, description="torch CPU threads while sampling; 0 keeps torch's default of one per core"
    )


class Stage(Section):
    """One stage of a multi-stage recipe: a name and the sections it changes (merged over the recipe)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="also the stage's sub-directory of the run")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="e.g. {model: {stage: vae}, train: {steps: 300}}"
    )


class RunConfig(Section):
    """One run: the method name, its model section, the core sections, and optional stages run in order.

    With ``stages``, ``cdlm train`` runs each stage into ``OUTPUT_DIR/<name>``, each initialised from the weights
    the previous stage ended with (``train.init_from``).
    """

    method: str
    description: str = ""
    seed: int = 0
    model: Any = Field(description="validated by the method's MethodSpec.config_cls")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SerializeAsAny[SampleConfig] = Field(
        default_factory=SampleConfig, description="validated by the method's MethodSpec.sample_config_cls"
    )
    stages: list[Stage] = Field(default_factory=list)
