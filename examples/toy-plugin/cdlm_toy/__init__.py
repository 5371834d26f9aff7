"""A complete cdlm method in one file: a flow over frozen random token embeddings.

Only the four components are written here; the core composes the objective and the pipeline from them.
"""

from __future__ import annotations

import torch
from pydantic import PositiveInt
from torch import Tensor, nn

from cdlm.config import RunConfig, Section
from cdlm.flow import XPredictionSchedule
from cdlm.interfaces import Conditioning, Denoiser, Discretizer, Embedder, Method, MethodSpec, TokenBatch
from cdlm.pipeline import FlowSampleConfig


class ToyConfig(Section):
    """The recipe's ``model:`` section."""

    vocab_size: PositiveInt = 64
    latent_dim: PositiveInt = 8
    hidden_size: PositiveInt = 32
    max_length: PositiveInt = 16


class ToyEmbedder(Embedder):
    """Each token is a row of a random N(0, 1) table, frozen (the build lists it under ``frozen``)."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.table = nn.Embedding(cfg.vocab_size, cfg.latent_dim)

    def forward(self, batch: TokenBatch) -> Tensor:
        return self.table(batch.ids)  # (B, L, C)


class ToyDenoiser(Denoiser):
    """An MLP of (z, t) per position that predicts the clean latent x̂."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        C, H = cfg.latent_dim, cfg.hidden_size
        self.net = nn.Sequential(nn.Linear(C + 1, H), nn.GELU(), nn.Linear(H, C))

    def forward(self, z: Tensor, t: Tensor, cond: Conditioning, self_cond: Tensor | None = None) -> Tensor:
        times = t.to(z.dtype)[:, None, None].expand(-1, z.shape[1], 1)  # (B, N, 1)
        return self.net(torch.cat([z, times], dim=-1))  # x̂ (B, N, C)


class NearestEmbedding(Discretizer):
    """Logits are minus the squared distances to the embedder's rows: the argmax is the nearest token."""

    def __init__(self, embedder: ToyEmbedder) -> None:
        super().__init__()
        self.embedder = embedder  # shared with the Embedder, not a copy

    def forward(self, z: Tensor, cond: Conditioning) -> Tensor:
        return -torch.cdist(z, self.embedder.table.weight[None]).pow(2)  # (B, L, V)


def build(config: RunConfig) -> Method:
    """Build the toy from a run config: only the denoiser trains; the core supplies objective and pipeline."""
    cfg: ToyConfig = config.model
    with torch.random.fork_rng(devices=[]):  # initialise from the run's seed; the global RNG stays as it was
        torch.manual_seed(config.seed)
        embedder, denoiser = ToyEmbedder(cfg), ToyDenoiser(cfg)
    return Method(
        embedder=embedder,
        denoiser=denoiser,
        schedule=XPredictionSchedule(noise_scale=1.0),  # the core path, uniform training times
        discretizer=NearestEmbedding(embedder),
        latent_shape=(cfg.max_length, cfg.latent_dim),
        vocab_size=cfg.vocab_size,
        trainable={"denoiser": denoiser},
        frozen={"embedder": embedder},
    )


spec = MethodSpec("toy", "a flow over frozen random embeddings", ToyConfig, build, sample_config_cls=FlowSampleConfig)
