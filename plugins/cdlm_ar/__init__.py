"""``ar``: the autoregressive baseline and Gen-PPL judge, a GPT-2-class causal LM on the shared loop.

Not a flow: it has none of the four flow components, only a next-token objective and a left-to-right
pipeline. It trains with ``cdlm train`` on the same data and tokenizer as the diffusion recipes (recipe
``ar-tiny``), samples with ``cdlm sample``, and ``cdlm convert RUN --to hf-causal-lm DIR`` turns it into a
plain ``transformers`` model that ``cdlm eval --judge DIR`` scores with.
"""

from __future__ import annotations

import torch

from cdlm.config import RunConfig
from cdlm.interfaces import Method, MethodSpec
from cdlm_ar.config import ArConfig, ArSampleConfig
from cdlm_ar.lm import AutoregressivePipeline, NextTokenObjective, gpt2
from cdlm_ar.released import MODULE, HfCausalLM


def build(config: RunConfig) -> Method:
    """Build the GPT-2 of ``config.model`` (initialised from ``config.seed``), its objective and pipeline."""
    cfg: ArConfig = config.model
    model = gpt2(cfg, generator=torch.Generator().manual_seed(config.seed))
    return Method(
        objective=NextTokenObjective(model),
        pipeline=AutoregressivePipeline(cfg, model),
        vocab_size=cfg.vocab_size,
        trainable={MODULE: model},
    )


def check(config: RunConfig) -> list[tuple[tuple[str, ...], str]]:
    """Rows must fit the context: ``data.seq_len`` ≤ ``model.max_length``."""
    if config.data.seq_len > config.model.max_length:
        return [
            (
                ("data.seq_len", "model.max_length"),
                f"{config.data.seq_len} exceeds model.max_length {config.model.max_length} (GPT-2 n_positions); "
                "raise model.max_length or lower data.seq_len",
            )
        ]
    return []


spec = MethodSpec(
    name="ar",
    description="autoregressive baseline and Gen-PPL judge: a GPT-2-class causal LM trained by next-token CE",
    config_cls=ArConfig,
    build=build,
    released_formats=(HfCausalLM(),),
    check=check,
    sample_config_cls=ArSampleConfig,
)
