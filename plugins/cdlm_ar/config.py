"""The ``model:`` and ``sample:`` sections of the autoregressive baseline (a GPT-2-class causal LM)."""

from __future__ import annotations

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt

from cdlm.config import SampleConfig, Section


class ArConfig(Section):
    """Shapes of a ``transformers`` ``GPT2LMHeadModel`` and the token ids generation needs."""

    vocab_size: PositiveInt = Field(512, description="must cover the tokenizer (data.vocab_size for a trained BPE)")
    max_length: PositiveInt = Field(64, description="context length (GPT-2 n_positions); data.seq_len must fit it")
    hidden_size: PositiveInt = Field(128, description="n_embd")
    depth: PositiveInt = Field(4, description="n_layer")
    num_heads: PositiveInt = Field(4, description="n_head")
    dropout: NonNegativeFloat = Field(0.0, le=1.0, description="residual, embedding and attention dropout")
    eos_id: int = Field(1, ge=0, description="end of text; also the first token of unconditional samples")
    pad_id: int = Field(0, ge=0, description="padding id (never generated)")


class ArSampleConfig(SampleConfig):
    """Left-to-right sampling: ancestral at temperature 1 by default, ``max_new_tokens`` per sample."""

    temperature: NonNegativeFloat = Field(1.0, description="token selection temperature; 0 means argmax")
    max_new_tokens: PositiveInt = Field(63, description="tokens generated per sample (at most the context left)")
    repetition_penalty: PositiveFloat = Field(1.0, description="penalty on ids already in the sample; 1 disables")
