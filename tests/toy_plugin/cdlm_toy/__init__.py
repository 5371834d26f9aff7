"""A throwaway method for tests: the smallest thing that honours the plugin contract.

Embedder: an embedding table. Denoiser: a 2-layer MLP of (z, t) predicting x. Schedule: the core
:class:`~cdlm.flow.RectifiedFlow` with uniform training times. Discretizer: a linear head. Objective: MSE in
v-space plus the head's cross-entropy on the clean latents, every draw from the given generator. Pipeline:
Euler steps on a uniform grid through the shared :func:`~cdlm.sampling.solvers.integrate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import Tensor, nn

from cdlm.config import RunConfig, Section
from cdlm.data.pack import pack_documents
from cdlm.data.tokenize import SpecialIds
from cdlm.flow import RectifiedFlow
from cdlm.interfaces import (
    Denoiser,
    Discretizer,
    Embedder,
    FlowSchedule,
    GenerateOutput,
    GenerateRequest,
    LossOutput,
    Method,
    MethodSpec,
    Objective,
    Pipeline,
    TokenBatch,
)
from cdlm.sampling import grids
from cdlm.sampling.solvers import integrate
from cdlm.sampling.types import Prediction, StepCallback


class ToyConfig(Section):
    vocab_size: PositiveInt = 64
    latent_dim: PositiveInt = 8
    hidden_size: PositiveInt = 32
    max_length: PositiveInt = 16


class ToyEmbedder(Embedder):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.table = nn.Embedding(cfg.vocab_size, cfg.latent_dim)

    def forward(self, batch: TokenBatch) -> Tensor:
        return self.table(batch.ids)  # (B, L, C)


class ToyDenoiser(Denoiser):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.latent_dim + 1, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.latent_dim)
        )

    def forward(self, z: Tensor, t: Tensor, cond: object, self_cond: Tensor | None = None) -> Tensor:
        times = t.to(z.dtype)[:, None, None].expand(-1, z.shape[1], 1)  # (B, N, 1)
        return self.net(torch.cat([z, times], dim=-1))  # x̂ (B, N, C)


class ToySchedule(FlowSchedule):
    flow = RectifiedFlow(noise_scale=1.0, t_eps=0.05)

    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.rand(n, generator=generator)

    def interpolate(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self.flow.interpolate(x, eps, t)

    def predict(self, out: Tensor, z: Tensor, t: Tensor) -> Prediction:
        x = out.float()
        return Prediction(x=x, v=self.flow.velocity_from_x(x, z.float(), t.float()))


class ToyDiscretizer(Discretizer):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.head = nn.Linear(cfg.latent_dim, cfg.vocab_size)

    def forward(self, z: Tensor, cond: object) -> Tensor:
        return self.head(z)  # (B, L, V)


class ToyObjective(Objective):
    def __init__(self, embedder: ToyEmbedder, denoiser: ToyDenoiser, schedule: ToySchedule, head: ToyDiscretizer):
        self.embedder, self.denoiser, self.schedule, self.head = embedder, denoiser, schedule, head

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        x = self.embedder(batch)  # (B, L, C)
        t = self.schedule.sample_t(x.shape[0], generator).to(x.device)  # (B,)
        eps = torch.randn(x.shape, generator=generator).to(x.device)  # (B, L, C)
        z = self.schedule.interpolate(x, eps, t)
        pred = self.schedule.predict(self.denoiser(z, t, None), z, t)
        v_target = self.schedule.flow.velocity_from_x(x, z, t)
        mask = batch.mask.float()  # (B, L)
        denom = mask.sum().clamp_min(1.0)
        mse = (((pred.v - v_target) ** 2).mean(-1) * mask).sum() / denom
        ce_tok = F.cross_entropy(self.head(x, None).transpose(1, 2), batch.ids, reduction="none")  # (B, L)
        ce = (ce_tok * mask).sum() / denom
        return LossOutput(loss=mse + ce, metrics={"mse": mse.item(), "ce": ce.item()})


class ToyPipeline(Pipeline):
    def __init__(self, cfg: ToyConfig, denoiser: ToyDenoiser, schedule: ToySchedule, head: ToyDiscretizer):
        self.cfg, self.denoiser, self.schedule, self.head = cfg, denoiser, schedule, head

    @torch.no_grad()
    def __call__(
        self, request: GenerateRequest, generator: torch.Generator, on_step: StepCallback | None = None
    ) -> GenerateOutput:
        device = next(self.denoiser.parameters()).device
        shape = (request.num_samples, self.cfg.max_length, self.cfg.latent_dim)
        z = torch.randn(shape, generator=generator).to(device)  # (B, L, C) drawn on CPU

        def predict(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
            return self.schedule.predict(self.denoiser(z, t, None), z, t)

        out = integrate(predict, z, grids.uniform(request.settings.steps).to(device), on_step=on_step)
        ids = self.head(out.z, None).argmax(-1)  # (B, L)
        return GenerateOutput(ids=ids.tolist(), nfe=out.nfe)


def build(config: RunConfig) -> Method:
    cfg: ToyConfig = config.model
    embedder, denoiser, schedule, head = ToyEmbedder(cfg), ToyDenoiser(cfg), ToySchedule(), ToyDiscretizer(cfg)
    return Method(
        embedder=embedder,
        denoiser=denoiser,
        schedule=schedule,
        discretizer=head,
        objective=ToyObjective(embedder, denoiser, schedule, head),
        pipeline=ToyPipeline(cfg, denoiser, schedule, head),
        vocab_size=cfg.vocab_size,
        trainable={"embedder": embedder, "denoiser": denoiser, "discretizer": head},
    )


def random_rows(num_docs: int = 40, seed: int = 0, cfg: ToyConfig | None = None) -> TokenBatch:
    """Packed rows of random documents (ids 3..V-1, EOS 1, pad 0) for training the toy in tests."""
    cfg = cfg or ToyConfig()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 2 * cfg.max_length, (num_docs,), generator=g).tolist()
    docs = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    return pack_documents(docs, cfg.max_length, SpecialIds(pad=0, eos=1), "pad")


spec = MethodSpec(name="toy", description="throwaway test method (MLP denoiser)", config_cls=ToyConfig, build=build)
