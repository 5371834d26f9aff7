"""Sampling for evaluation: :func:`cdlm.sample` plus what a record needs (network evaluations, seconds, settings)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cdlm.api import Pretrained, Sample, sample
from cdlm.config import SampleConfig
from cdlm.interfaces import GenerateOutput, GenerateRequest, Pipeline
from cdlm.recipes import raw_config, with_overrides
from cdlm.sampling.types import StepCallback


class _CountingPipeline(Pipeline):
    """Wraps a method's pipeline and adds up the network evaluations of every call."""

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner
        self.nfe = 0

    def __call__(
        self, request: GenerateRequest, generator: torch.Generator, on_step: StepCallback | None = None
    ) -> GenerateOutput:
        out = self.inner(request, generator, on_step)
        self.nfe += out.nfe
        return out


@dataclass(frozen=True)
class Generation:
    """Samples and how they were made.

    Attributes:
        samples: one :class:`cdlm.Sample` per prompt (or per unconditional sample).
        settings: the ``sample:`` section used (the model's, with the overrides).
        nfe: network evaluations over all samples, as the pipeline counts them (decoder calls included).
        seconds: wall time of the sampling.
    """

    samples: list[Sample]
    settings: SampleConfig
    nfe: int
    seconds: float


def generate(
    loaded: Pretrained,
    *,
    prompts: Sequence[str] | None = None,
    sample_ids: Sequence[int | str | None] | None = None,
    overrides: Sequence[str] = (),
    on_step: StepCallback | None = None,
    keep_special_tokens: bool = False,
) -> Generation:
    """Sample from a loaded model with ``sample.*`` overrides, counting network evaluations and time.

    Args:
        loaded: the model (:func:`cdlm.load_pretrained`).
        prompts: sources or prompts, one sample each; None samples ``sample.num_samples`` unconditionally.
        sample_ids: one id per prompt (keys per-sample noise where the method does).
        overrides: ``sample.*`` overrides, e.g. ``sample.steps=16``.
        on_step: per solver step callback (progress).
        keep_special_tokens: keep special tokens in the text (Cola's task outputs do).
    """
    counter = _CountingPipeline(loaded.method.pipeline)
    counted = dataclasses.replace(loaded, method=dataclasses.replace(loaded.method, pipeline=counter))
    settings = with_overrides(raw_config(loaded.config), overrides).sample
    start = time.perf_counter()
    samples = sample(
        counted,
        prompts=prompts,
        sample_ids=sample_ids,
        overrides=overrides,
        on_step=on_step,
        keep_special_tokens=keep_special_tokens,
    )
    return Generation(samples=samples, settings=settings, nfe=counter.nfe, seconds=time.perf_counter() - start)
