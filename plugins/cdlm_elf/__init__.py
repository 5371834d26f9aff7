"""ELF (Embedded Language Flows, arXiv 2605.10938) as a cdlm plugin.

Flow matching in the embedding space of a frozen T5 encoder; one shared network denoises (x-prediction)
and, in its final step, decodes to tokens. Spec: ``shared/specs/elf.md``.
"""

from __future__ import annotations

import torch
from torch import nn

from cdlm.config import RunConfig
from cdlm.interfaces import Method, MethodSpec, Objective
from cdlm.training.distill import Teacher
from cdlm_elf.config import ElfConfig, ElfSampleConfig, check_run
from cdlm_elf.distill import ElfDistillObjective
from cdlm_elf.embedder import T5Embedder
from cdlm_elf.encoder_pretraining import MaskedLMObjective, trainable_encoder
from cdlm_elf.model import ElfDecoder, ElfDenoiser, ElfTransformer
from cdlm_elf.objective import ElfObjective
from cdlm_elf.pipeline import ElfPipeline
from cdlm_elf.released import ElfOfficialCheckpoint
from cdlm_elf.schedule import ElfSchedule


def build(config: RunConfig) -> Method:
    """Build ELF from a run config: the T5 embedder, one network viewed as denoiser and decoder, objective, pipeline."""
    cfg: ElfConfig = config.model
    embedder = T5Embedder(cfg)
    network = ElfTransformer(cfg, generator=torch.Generator().manual_seed(config.seed))  # spec §1.4 init
    denoiser, decoder, schedule = ElfDenoiser(network), ElfDecoder(network), ElfSchedule(cfg)
    pad_token = config.data.pad_token
    objective: Objective = ElfObjective(cfg, embedder, network, schedule, pad_token=pad_token)
    if cfg.distill is not None:  # a progressive-distillation student (spec §8); the teacher is read on first use
        objective = ElfDistillObjective(cfg, embedder, network, schedule, Teacher(cfg.distill), pad_token=pad_token)
    trainable: dict[str, nn.Module] = {"network": network}
    frozen: dict[str, nn.Module] = {"embedder": embedder}
    if cfg.stage == "encoder":  # a first stage that pretrains the encoder (masked LM) when none is at hand
        objective = MaskedLMObjective(cfg, trainable_encoder(embedder))
        trainable, frozen = frozen, trainable
    return Method(
        embedder=embedder,
        denoiser=denoiser,
        schedule=schedule,
        discretizer=decoder,
        objective=objective,
        pipeline=ElfPipeline(
            cfg,
            denoiser,
            decoder,
            schedule,
            embedder,
            eos_id=cfg.eos_id,
            pad_id=cfg.pad_id,
            conditional=config.data.source_field is not None,
        ),
        vocab_size=cfg.vocab_size,
        trainable=trainable,
        frozen=frozen,
    )


spec = MethodSpec(
    name="elf",
    description="Embedded Language Flows: flow matching in frozen T5 embeddings; one network denoises and decodes",
    config_cls=ElfConfig,
    build=build,
    released_formats=(ElfOfficialCheckpoint(),),
    check=check_run,
    sample_config_cls=ElfSampleConfig,
)
