"""The Cola baseline of benchmarks/cola_generation.py and run.py: the reference's way, on cdlm's components.

Not library code. ``ColaPipeline`` differs from the reference implementation (``generate_task_repaint_inference``,
spec §6.1) in how it runs, never in what it computes. This module runs the same components and weights the
other ways, so that the tests can check that they give the same tokens and the benchmarks can time them in one
process:

- ``cfg_batching="two_pass"``: a conditional and a separate unconditional DiT forward per Euler step (spec §5),
  as the reference does; ``"batched"``: one forward of 2B rows (the library's).
- ``planning="per_call"``: every DiT call rebuilds its mask, positions and RoPE tables, concatenates and rotates
  the whole cached history and runs the timestep embedding and AdaLN per token, as the reference does;
  ``"per_block"``: one plan per block (the library's, :meth:`~cdlm_cola.dit.ColaDiT.plan`).
- ``history="recompute"``: no KV cache; the networks re-run every sample's whole clean history at every call
  (``planning`` does not apply); ``"kv_cache"``: the library's.

They override the pipeline's hooks: ``start`` (the state: KV caches or recomputed histories), ``denoise`` (the
core's default, the DiT without a plan, for ``per_call``) and ``predictor`` (two CFG passes).
tests/plugins/cola/test_generate.py checks these paths against the library's and the reference's traced runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from cdlm.pipeline import FlowPipeline
from cdlm.sampling.guidance import combine, conditional
from cdlm.sampling.types import DenoiseFn, PredictFn, Prediction
from cdlm_cola.components import (
    DATA_TIME,
    ColaCond,
    ColaDecoder,
    ColaDenoiser,
    ColaEmbedder,
    ColaGenerationState,
)
from cdlm_cola.config import ColaConfig, ColaSampleConfig
from cdlm_cola.dit import ColaDiT
from cdlm_cola.generate import ColaPipeline, guidance_scale
from cdlm_cola.schedule import ColaSchedule
from cdlm_cola.vae import ColaTextVAE

CfgBatching = Literal["batched", "two_pass"]
History = Literal["kv_cache", "recompute"]
Planning = Literal["per_block", "per_call"]


def pipeline(
    cfg: ColaConfig,
    vae: ColaTextVAE,
    dit: ColaDiT,
    cfg_batching: CfgBatching = "batched",
    history: History = "kv_cache",
    planning: Planning = "per_block",
) -> ColaPipeline:
    """Return a Cola pipeline over ``vae`` and ``dit`` that runs the given way; the defaults are the library's."""
    schedule = ColaSchedule(cfg)
    embedder, denoiser, decoder = ColaEmbedder(vae), ColaDenoiser(dit, schedule), ColaDecoder(vae)
    options = (cfg_batching, history, planning)
    if options == ("batched", "kv_cache", "per_block"):
        return ColaPipeline(cfg, embedder=embedder, denoiser=denoiser, schedule=schedule, decoder=decoder)
    return ReferencePipeline(cfg, options, embedder=embedder, denoiser=denoiser, schedule=schedule, decoder=decoder)


class ReferencePipeline(ColaPipeline):
    """``ColaPipeline`` run another way: ``options`` is ``(cfg_batching, history, planning)`` (module docstring)."""

    def __init__(
        self,
        cfg: ColaConfig,
        options: tuple[CfgBatching, History, Planning],
        *,
        embedder: ColaEmbedder,
        denoiser: ColaDenoiser,
        schedule: ColaSchedule,
        decoder: ColaDecoder,
    ) -> None:
        super().__init__(cfg, embedder=embedder, denoiser=denoiser, schedule=schedule, decoder=decoder)
        self.cfg_batching, self.history, self.planning = options

    def start(self, prefix: Sequence[Tensor]) -> ColaGenerationState:
        if self.history == "recompute":
            return RecomputedHistory(self.denoiser, self.decoder, prefix)
        return super().start(prefix)

    def denoise(self, z: Tensor, t: Tensor, x_prev: Tensor, cond: ColaCond) -> Prediction:
        if self.history == "recompute":
            return self.schedule.predict(recomputed_velocity(self.denoiser, z, t, cond), z, t)
        if self.planning == "per_call":
            return FlowPipeline.denoise(self, z, t, x_prev, cond)  # the core's: the DiT at every call, no plan
        return super().denoise(z, t, x_prev, cond)

    def predictor(self, cond: ColaCond, settings: ColaSampleConfig) -> PredictFn:
        if self.cfg_batching == "two_pass":
            return two_pass_cfg(self.denoise, cond, guidance_scale(cond, settings.guidance))
        return super().predictor(cond, settings)


def two_pass_cfg(denoise: DenoiseFn, cond: ColaCond, scale: float | Tensor) -> PredictFn:
    """Return the reference's CFG: a conditional and a separate unconditional forward per step (spec §5).

    Numerically the same as :func:`~cdlm.sampling.guidance.classifier_free` over 2B rows.
    """
    if not isinstance(scale, Tensor) and scale == 1.0:
        return conditional(denoise, cond)
    null = cond.null()

    def guided(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        c, u = denoise(z, t, x_prev, cond), denoise(z, t, x_prev, null)
        return combine(Prediction(x=torch.cat([c.x, u.x]), v=torch.cat([c.v, u.v])), scale)

    return guided


@dataclass(frozen=True)
class RecomputeCond(ColaCond):
    """Rows whose clean histories are re-run at every call instead of read from a KV cache.

    ``cached`` holds each row's history length, as a cached row's does, but nothing is read from a cache.

    Attributes:
        context: per row, its clean history latents (h_i, C) (h_i = 0 for a fresh row).
    """

    context: tuple[Tensor, ...] = ()

    def null(self) -> RecomputeCond:
        return replace(super().null(), context=tuple(c[:0] for c in self.context))

    def with_null_rows(self) -> RecomputeCond:
        return replace(super().with_null_rows(), context=self.context + self.null().context)


class RecomputedHistory(ColaGenerationState):
    """A batch's history as clean latents (h_i, C) per sample, re-run through the networks at every call."""

    def __init__(self, denoiser: ColaDenoiser, decoder: ColaDecoder, prefix: Sequence[Tensor]) -> None:
        super().__init__(denoiser, decoder, [])  # no caches to fill
        self.history = list(prefix)

    def cond(self, pinned: Tensor | None = None, clean: Tensor | None = None) -> RecomputeCond:
        lengths = tuple(h.shape[0] for h in self.history)
        return RecomputeCond(lengths, self, pinned, clean, tuple(self.history))

    def decode(self, z: Tensor) -> Tensor:
        return recomputed_logits(self.decoder, z, self.cond())

    def commit(self, z: Tensor) -> int:
        self.history = [torch.cat([h, zi]) for h, zi in zip(self.history, z, strict=True)]
        return 0  # nothing runs: the next calls re-run the history


def recomputed_velocity(denoiser: ColaDenoiser, z: Tensor, t: Tensor, cond: RecomputeCond) -> Tensor:
    """Return the DiT's velocity (B, bs, C) for blocks z (B, bs, C) at core times t (B,) after their histories."""
    rows, bs, _ = z.shape
    t_tok = t.float()[:, None].expand(rows, bs)  # (B, bs)
    if cond.pinned is not None:
        t_tok = torch.where(cond.pinned, DATA_TIME, t_tok)
    clean = [torch.full((c.shape[0],), DATA_TIME, device=z.device) for c in cond.context]
    txt, lens = _with_context(cond.context, z)
    timestep = denoiser.schedule.model_time(torch.cat([u for pair in zip(clean, t_tok, strict=True) for u in pair]))
    return _tails(denoiser.dit(txt, lens, lens, timestep), lens, bs)


def recomputed_logits(decoder: ColaDecoder, z: Tensor, cond: RecomputeCond) -> Tensor:
    """Return the decoder's logits (B, bs·ps, V) for blocks z (B, bs, C) after their histories."""
    txt, lens = _with_context(cond.context, z)
    ps = decoder.vae.config.patch_size
    return _tails(decoder.vae.decode(txt, lens, lens), [n * ps for n in lens], z.shape[1] * ps)


def _with_context(context: Sequence[Tensor], z: Tensor) -> tuple[Tensor, list[int]]:
    """Lay out ``[context_i ; z_i]`` per row in the NA layout: (Σ(h_i + bs), C) and the per-row lengths."""
    txt = torch.cat([u for pair in zip(context, z, strict=True) for u in pair])
    return txt, [c.shape[0] + z.shape[1] for c in context]


def _tails(out: Tensor, lens: Sequence[int], n: int) -> Tensor:
    """Return the last ``n`` rows of every sample of an NA-layout output (ΣL, …) as (B, n, …)."""
    return torch.stack([o[-n:] for o in out.split(list(lens))])
