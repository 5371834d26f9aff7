"""The core generation pipeline: sampling composed from a method's four components.

Per batch of ``settings.batch_size`` rows, :class:`FlowPipeline`

1. builds the rows' conditioning (:meth:`~FlowPipeline.condition`; None: unconditional);
2. builds the time grid of the settings (:func:`time_grid`, drawn per batch for ``grid: logit_normal``);
3. draws the noise z₀ = s·ε (B, N, C), s the schedule's ``noise_scale``;
4. integrates it to t = 1 with the shared solver (:func:`rollout`): the prediction is the Denoiser read through
   the schedule (:meth:`~FlowPipeline.denoise`) under classifier-free guidance (:meth:`~FlowPipeline.predictor`);
5. selects tokens from the Discretizer's logits (:meth:`~FlowPipeline.decode`) and turns them into one list of
   ids per row (:meth:`~FlowPipeline.postprocess`).

Every draw comes from the one explicit generator, in this order per batch: the grid, z₀, the per-step SDE
noise, then token sampling when the temperature is positive. A method changes only what differs by overriding
those hooks (and :meth:`~FlowPipeline.check`, :meth:`~FlowPipeline.constrain`); ELF (:mod:`cdlm_elf.pipeline`)
pins its condition positions, carries SC-CFG in its conditioning, decodes greedily and cuts rows at EOS. Cola
(:mod:`cdlm_cola.generate`) replaces the batch step (:meth:`~FlowPipeline.generate_batch`) by a loop over blocks,
each integrated and decoded through the same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import AliasChoices, Field, NonNegativeFloat, PositiveFloat
from torch import Tensor

from cdlm.config import SampleConfig
from cdlm.errors import DataError, PluginError
from cdlm.interfaces import Conditioning, Denoiser, Discretizer, FlowSchedule, GenerateOutput, GenerateRequest, Pipeline
from cdlm.sampling import grids
from cdlm.sampling.guidance import classifier_free
from cdlm.sampling.solvers import integrate
from cdlm.sampling.tokens import select_tokens
from cdlm.sampling.types import PredictFn, Prediction, SampleOutput, StepCallback

if TYPE_CHECKING:
    from cdlm.interfaces import Method

Constrain = Callable[[Tensor], Tensor]
"""A map applied to the state (B, N, C) before the first step and after every step (e.g. pin a prompt)."""


class FlowSampleConfig(SampleConfig):
    """The sampling settings :class:`FlowPipeline` reads: the solver, the time grid and classifier-free guidance.

    A method sampled by the core pipeline declares it (or a subclass with its own defaults) as its
    ``MethodSpec.sample_config_cls``. Defaults: Euler steps on a uniform grid, no guidance.
    """

    sampler: Literal["euler", "heun", "midpoint", "dpm2m", "sde"] = Field(
        "euler",
        description="euler; heun / midpoint (2 evaluations per step); dpm2m (second-order multistep for "
        "x-prediction, 1 evaluation per step); sde (ELF's back-off sampler, with churn)",
    )
    grid: Literal["uniform", "logit_normal", "logit_normal_quantiles", "shifted"] = Field(
        "uniform",
        description="uniform; logit_normal (inner times drawn per batch, ELF spec §4.1); logit_normal_quantiles "
        "(the same density, deterministic); shifted (uniform warped toward noise by grid_shift)",
    )
    grid_mean: float = Field(-1.5, description="logit-normal grid location (ELF spec §4.1)")
    grid_std: PositiveFloat = Field(0.8, description="logit-normal grid scale (ELF spec §4.1)")
    grid_shift: PositiveFloat = Field(1.0, description="shifted grid: > 1 spends more steps near the noise end")
    churn: NonNegativeFloat = Field(0.0, description="SDE γ: back-off per unit time (sampler: sde, ELF spec §4.3)")
    guidance: float = Field(
        1.0,
        validation_alias=AliasChoices("guidance", "cfg"),  # cfg: its name in run configs saved before the rename
        description="classifier-free guidance scale; 1 disables it",
    )


def time_grid(settings: FlowSampleConfig, generator: torch.Generator) -> Tensor:
    """Return the (steps + 1,) fp32 grid of ``settings``; a logit-normal grid is drawn from ``generator``."""
    if settings.grid == "uniform":
        return grids.uniform(settings.steps)
    if settings.grid == "shifted":
        return grids.shifted(settings.steps, settings.grid_shift)
    if settings.grid == "logit_normal_quantiles":
        return grids.logit_normal_quantiles(settings.steps, settings.grid_mean, settings.grid_std)
    return grids.logit_normal(settings.steps, generator, settings.grid_mean, settings.grid_std)


def rollout(
    predict: PredictFn,
    z0: Tensor,
    grid: Tensor,
    settings: FlowSampleConfig,
    *,
    noise_scale: float,
    generator: torch.Generator,
    constrain: Constrain,
    on_step: StepCallback | None = None,
) -> SampleOutput:
    """Integrate from noise z₀ (B, N, C) along ``grid`` with ``settings.sampler`` (ELF spec §4.3 steps 1–3).

    ``constrain`` is applied to z₀ and after every step. The last step is always a plain Euler (ODE) step to
    t = 1; the SDE back-off uses γ = ``settings.churn`` and re-noises with ``noise_scale``·ε from ``generator``.
    """
    return integrate(
        predict,
        constrain(z0),
        grid,
        method=settings.sampler,
        churn=settings.churn,
        noise_scale=noise_scale,
        generator=generator,
        constrain=constrain,
        last_step="euler",
        on_step=on_step,
    )


def decode_tokens(
    discretizer: Discretizer, z: Tensor, cond: Conditioning, settings: SampleConfig, generator: torch.Generator
) -> Tensor:
    """Return token ids (B, L) for the final state z (B, N, C): the discretizer's logits through ``select_tokens``.

    Every position is decoded at once, so there is no generated history for a repetition penalty.
    """
    return select_tokens(
        discretizer(z, cond),
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        generator=generator,
    )


def _unchanged(z: Tensor) -> Tensor:
    return z


class FlowPipeline(Pipeline):
    """Unconditional generation with a method's four components (see the module docstring for the steps).

    Args:
        denoiser: the network, called as ``denoiser(z, t, cond)``.
        schedule: reads the denoiser's raw output as a prediction; its ``noise_scale`` is the noise end.
        discretizer: turns the final state into token logits.
        latent_shape: ``(N, C)``, the latents of one generated row.
    """

    decoder_calls: int = 0
    """Network evaluations the discretizer spends per batch, counted in ``nfe`` (ELF: 1, its decoder is the
    denoiser's network in decode mode)."""

    def __init__(
        self, denoiser: Denoiser, schedule: FlowSchedule, discretizer: Discretizer, latent_shape: tuple[int, int]
    ) -> None:
        self.denoiser, self.schedule, self.discretizer = denoiser, schedule, discretizer
        self.latent_shape = latent_shape

    @classmethod
    def for_method(cls, method: Method) -> FlowPipeline:
        """Compose the pipeline of a method's components."""
        assert method.denoiser and method.schedule and method.discretizer and method.latent_shape
        return cls(method.denoiser, method.schedule, method.discretizer, method.latent_shape)

    @torch.no_grad()
    def __call__(
        self, request: GenerateRequest, generator: torch.Generator, on_step: StepCallback | None = None
    ) -> GenerateOutput:
        """Generate ``request.num_samples`` rows of N latents, in batches of ``settings.batch_size``.

        ``nfe`` counts the prediction calls of every batch, plus :attr:`decoder_calls` per batch.

        Raises:
            DataError: the request cannot be served (:meth:`check`).
            PluginError: the settings are not a :class:`FlowSampleConfig`.
        """
        self.check(request)
        ids: list[list[int]] = []
        nfe = 0
        for start in range(0, request.num_samples, request.settings.batch_size):
            rows = slice(start, min(start + request.settings.batch_size, request.num_samples))
            batch_ids, batch_nfe = self.generate_batch(request, rows, generator, on_step)
            ids.extend(batch_ids)
            nfe += batch_nfe
        return GenerateOutput(ids=ids, nfe=nfe)

    def generate_batch(
        self, request: GenerateRequest, rows: slice, generator: torch.Generator, on_step: StepCallback | None
    ) -> tuple[list[list[int]], int]:
        """Generate the rows ``rows`` of ``request`` as one batch (steps 1–5 of the module docstring).

        Returns:
            One list of ids per row, and the network evaluations spent: the prediction calls plus
            :attr:`decoder_calls`.
        """
        settings, size = request.settings, rows.stop - rows.start
        prompts = None if request.prompts is None else request.prompts[rows]
        cond = self.condition(size, prompts, settings)
        grid = time_grid(settings, generator)
        shape = (size, *self.latent_shape)  # (B, N, C)
        z0 = self.schedule.noise_scale * torch.randn(shape, generator=generator, device=generator.device)
        out = rollout(
            self.predictor(cond, settings),
            z0.to(self.device()),
            grid,
            settings,
            noise_scale=self.schedule.noise_scale,
            generator=generator,
            constrain=self.constrain(cond),
            on_step=on_step,
        )
        tokens = self.decode(out.z, cond, settings, generator).cpu()  # (B, L)
        return self.postprocess(tokens, prompts), out.nfe + self.decoder_calls

    def check(self, request: GenerateRequest) -> None:
        """Refuse a request this pipeline cannot serve, before any work.

        Raises:
            PluginError: the settings are not a :class:`FlowSampleConfig` (the method's ``sample_config_cls``).
            DataError: prompts, or a guidance scale, for this unconditional pipeline.
        """
        settings = request.settings
        if not isinstance(settings, FlowSampleConfig):
            raise PluginError(
                f"{type(self).__name__}: the sample settings are a {type(settings).__name__}, but the core pipeline "
                "reads cdlm.pipeline.FlowSampleConfig (sampler, grid, cfg); set sample_config_cls=FlowSampleConfig "
                "(or a subclass) in the plugin's MethodSpec"
            )
        if request.prompts is not None:
            raise DataError(
                "prompts (--prompt, --prompts-file): this method generates unconditionally (its pipeline builds no "
                "condition from a prompt); sample without prompts"
            )
        if settings.guidance != 1.0:
            raise DataError(
                f"sample.guidance={settings.guidance} (--guidance): classifier-free guidance contrasts a condition "
                "with its absence, and this method generates unconditionally; leave sample.guidance at 1"
            )

    def condition(self, size: int, prompts: list[list[int]] | None, settings: FlowSampleConfig) -> Conditioning:
        """Return the conditioning of ``size`` rows (plugin-defined) for their prompts; None: unconditional.

        Args:
            size: number of rows B.
            prompts: B lists of prompt token ids, or None.
            settings: the request's sample settings.
        """
        return None

    def denoise(self, z: Tensor, t: Tensor, x_prev: Tensor, cond: Conditioning) -> Prediction:
        """The DenoiseFn guidance wraps: the denoiser's raw output at (z, t) read through the schedule.

        Args:
            z: (B, N, C) state.
            t: (B,) core times.
            x_prev: (B, N, C) the previous x̂ (the self-conditioning carry; unused by a plain denoiser).
            cond: the rows' conditioning.
        """
        return self.schedule.predict(self.denoiser(z, t, cond), z, t)

    def predictor(self, cond: Conditioning, settings: FlowSampleConfig) -> PredictFn:
        """Return what the solver integrates: :meth:`denoise` under classifier-free guidance ``settings.guidance``."""
        return classifier_free(self.denoise, cond, settings.guidance)

    def constrain(self, cond: Conditioning) -> Constrain:
        """Return the map applied to the state before and after every step; the identity by default."""
        return _unchanged

    def decode(self, z: Tensor, cond: Conditioning, settings: FlowSampleConfig, generator: torch.Generator) -> Tensor:
        """Return token ids (B, L) for the final state z (B, N, C) (:func:`decode_tokens`)."""
        return decode_tokens(self.discretizer, z, cond, settings, generator)

    def postprocess(self, tokens: Tensor, prompts: list[list[int]] | None) -> list[list[int]]:
        """Turn the decoded ids (B, L) of a batch into one list per row; every position by default."""
        return tokens.tolist()

    def device(self) -> torch.device:
        """Return the device of the denoiser's parameters, where generation runs."""
        return next(self.denoiser.parameters()).device
