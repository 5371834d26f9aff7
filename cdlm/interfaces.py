"""The plugin contract: four components, an objective, a generation pipeline, bundled by a MethodSpec.

Core time convention: ``t = 0`` is noise, ``t = 1`` is data, ``v = dz/dt`` (see :mod:`cdlm.flow`).
A plugin whose paper uses another convention converts in its own ``schedule.py`` and nowhere else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from cdlm.config import SampleConfig
from cdlm.errors import PluginError
from cdlm.sampling.types import Prediction, StepCallback

Conditioning = Any
"""Plugin-defined and opaque to the core. The one thing the core asks of it is ``cond.with_null_rows()``:
a conditioning for 2B rows, rows [0, B) conditional and rows [B, 2B) unconditional (classifier-free guidance)."""


@dataclass(frozen=True)
class TokenBatch:
    """A batch of token rows, as the data pipeline yields it.

    Attributes:
        ids: (B, L) int64 token ids.
        mask: (B, L) bool, True where the token is real (not padding).
        cond_mask: (B, L) bool, True on condition (source / prompt) positions; all False when unconditional.
    """

    ids: Tensor
    mask: Tensor
    cond_mask: Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        """Move every tensor to ``device``."""
        return TokenBatch(self.ids.to(device), self.mask.to(device), self.cond_mask.to(device))


class Embedder(nn.Module, ABC):
    """Maps tokens to the continuous sequence the flow is trained on."""

    @abstractmethod
    def forward(self, batch: TokenBatch) -> Tensor:
        """Return the clean latents x (B, N, C), fp32, for the rows of ``batch``."""


class Denoiser(nn.Module, ABC):
    """The network that moves a noisy state toward data."""

    @abstractmethod
    def forward(self, z: Tensor, t: Tensor, cond: Conditioning, self_cond: Tensor | None = None) -> Tensor:
        """Return the raw network output (B, N, C) for state z (B, N, C) at core times t (B,)."""


class FlowSchedule(ABC):
    """The rectified-flow path of a method: training times, noising, and the raw-output parametrisation."""

    @abstractmethod
    def sample_t(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` training times (n,) in core time."""

    @abstractmethod
    def interpolate(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Return the noisy state z_t (B, N, C) for data x, standard-normal noise eps and core times t (B,)."""

    @abstractmethod
    def predict(self, out: Tensor, z: Tensor, t: Tensor) -> Prediction:
        """Turn a raw Denoiser output (B, N, C) at state z and core times t (B,) into an fp32 Prediction."""

    @property
    def noise_scale(self) -> float:
        """``s``: the noise end of the path is ``z_0 = s·ε``, where generation starts and the SDE re-noises (1)."""
        return 1.0

    def velocity(self, x: Tensor, eps: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """Return the velocity (B, N, C) that the prediction's v̂ regresses to at ``z = interpolate(x, eps, t)``.

        The default is the exact velocity ``x − s·ε`` of the core path ``z_t = t·x + (1 − t)·s·ε``. A schedule with
        another path, or whose :meth:`predict` clamps its x → v conversion near t = 1, overrides it so that a
        perfect prediction has zero loss (:class:`cdlm.flow.XPredictionSchedule`).

        Args:
            x: (B, N, C) clean latents.
            eps: (B, N, C) standard-normal noise.
            z: (B, N, C) the noisy state.
            t: (B,) core times.
        """
        return x - self.noise_scale * eps


class Discretizer(nn.Module, ABC):
    """Maps a continuous sequence back to tokens."""

    @abstractmethod
    def forward(self, z: Tensor, cond: Conditioning) -> Tensor:
        """Return token logits (B, L, V) for the final state z (B, N, C)."""


@dataclass(frozen=True)
class LossOutput:
    """A training loss and the scalars to log with it.

    Attributes:
        loss: () scalar to back-propagate.
        metrics: extra scalars (detached floats), e.g. per-branch losses.
    """

    loss: Tensor
    metrics: Mapping[str, float] = field(default_factory=dict)


class Objective(ABC):
    """A method's training loss over a batch; every random draw comes from ``generator``."""

    @abstractmethod
    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Compute the loss of one micro-batch."""


@dataclass(frozen=True)
class GenerateRequest:
    """What to generate.

    Attributes:
        num_samples: number of sequences.
        prompts: token ids per sample to condition on or continue; None for unconditional generation.
        settings: the run's validated ``sample:`` section, an instance of the method's
            ``MethodSpec.sample_config_cls`` (a :class:`cdlm.config.SampleConfig` subclass).
        sample_ids: one identifier per sample (a prompt's ``id`` field), or None. A pipeline that seeds each
            sample's noise separately keys it by this id, so a sample's output does not depend on where it
            sits in the request (Cola spec §6.1 step 7.1).
    """

    num_samples: int
    prompts: list[list[int]] | None
    settings: SampleConfig
    sample_ids: list[int | str | None] | None = None


@dataclass(frozen=True)
class GenerateOutput:
    """Generated token ids (one list per sample, special tokens kept) and the network evaluations spent.

    Attributes:
        ids: the generated ids per sample.
        nfe: network evaluations spent.
        text_ends: per sample, where its text ends (the first end-of-text token), for pipelines that keep
            generating after it; None: the whole row is text (special tokens are skipped when decoding).
    """

    ids: list[list[int]]
    nfe: int
    text_ends: list[int] | None = None


class Pipeline(ABC):
    """A method's generation procedure, built on the shared samplers (:func:`cdlm.sampling.solvers.integrate`)."""

    @abstractmethod
    def __call__(
        self, request: GenerateRequest, generator: torch.Generator, on_step: StepCallback | None = None
    ) -> GenerateOutput:
        """Generate ``request.num_samples`` sequences."""


@dataclass(kw_only=True)
class Method:
    """A built method: its four components plus how to train and sample them.

    ``vocab_size`` is the number of token ids the method can read and emit; a tokenizer must not exceed it.
    Components may share parameters (ELF's Discretizer calls the Denoiser's network in decode mode);
    :meth:`modules` lists each module once, for the optimiser, the EMA and checkpoints.

    A flow method gives its four components. Its ``objective`` and ``pipeline`` default to the core ones composed
    from them (:class:`cdlm.objective.FlowMatchingObjective`, :class:`cdlm.pipeline.FlowPipeline`), which need
    ``latent_shape``; a method passes its own only where it differs, as an extension of the core ones (ELF's
    decoder rows and SC-CFG). A method that is not a flow (the autoregressive baseline ``ar``) has none of the
    four components, only its objective and pipeline.

    Attributes:
        latent_shape: ``(N, C)``, the latents of one row: what the core objective draws noise for (rows of
            ``data.seq_len`` tokens must embed to it) and the core pipeline generates. Needed only by the core
            objective and pipeline.

    Raises:
        PluginError: the core objective or pipeline is asked for without the four components or ``latent_shape``.
    """

    embedder: Embedder | None = None
    denoiser: Denoiser | None = None
    schedule: FlowSchedule | None = None
    discretizer: Discretizer | None = None
    objective: Objective | None = None
    pipeline: Pipeline | None = None
    vocab_size: int
    trainable: Mapping[str, nn.Module]
    frozen: Mapping[str, nn.Module] = field(default_factory=dict)
    latent_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.objective is not None and self.pipeline is not None:
            return
        needed = ("embedder", "denoiser", "schedule", "discretizer", "latent_shape")
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise PluginError(
                "Method: no objective or pipeline given, so the core composes them from the four components and "
                f"latent_shape, but these are missing: {', '.join(missing)}; a plugin's build passes embedder, "
                "denoiser, schedule, discretizer and latent_shape=(N, C) (the latents of one row), or its own "
                "objective and pipeline"
            )
        from cdlm.objective import FlowMatchingObjective  # both import this module, so they are imported here
        from cdlm.pipeline import FlowPipeline

        if self.objective is None:
            self.objective = FlowMatchingObjective.for_method(self)
        if self.pipeline is None:
            self.pipeline = FlowPipeline.for_method(self)

    def modules(self) -> nn.ModuleDict:
        """Return every module that owns parameters, trainable ones first, each once, keyed by a stable name."""
        return nn.ModuleDict({**self.trainable, **self.frozen})


class StateDictAdapter(ABC):
    """Maps an official checkpoint's key layout to ours and back. Pure dict → dict; no file I/O.

    A plugin's :class:`ReleasedFormat` reads and writes files and uses its adapter for the keys (ELF's
    ``ElfOfficialCheckpoint`` and ``ElfStateDictAdapter``), so the mapping is tested apart from any file.
    """

    name: ClassVar[str]

    @abstractmethod
    def from_official(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Official keys → our ``Method.modules()`` keys. Raises CheckpointError listing unknown/missing keys."""

    @abstractmethod
    def to_official(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Our keys → official keys (inverse of :meth:`from_official`)."""


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """A released (official) checkpoint read as it is: a recipe that builds a model it fits, and its weights.

    Attributes:
        recipe: the raw run config (a recipe mapping, before validation; the core applies ``--set`` overrides on
            top and validates it) that builds a model these weights load into.
        weights: the trained (raw, not averaged) weights in ``Method.modules()`` keys. Keys of frozen modules that
            the build loads by itself (ELF's pretrained T5 encoder, Cola's reference VAE) may be absent.
        ema: EMA shadows for some of ``weights``' keys (the ones sampling uses by default), or None.
        step: the training step the checkpoint records, or None.
    """

    recipe: dict[str, Any]
    weights: dict[str, Tensor]
    ema: dict[str, Tensor] | None = None
    step: int | None = None


class ReleasedFormat(ABC):
    """A released checkpoint layout that a plugin reads as it is and writes back (``cdlm convert``).

    The core tries every installed plugin's formats on a path that is not a cdlm run, checkpoint or
    ``save_pretrained`` directory (a hub id is downloaded first), and takes the first that :meth:`detect` s it.
    """

    name: ClassVar[str]
    """Short name used by ``cdlm convert --to NAME``, e.g. ``elf-official``."""

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Return whether ``path`` (a local file or directory) is in this layout; cheap, loads no tensors."""

    @abstractmethod
    def read(self, path: Path) -> ReleasedCheckpoint:
        """Read the checkpoint at ``path``. Raises CheckpointError naming the file and what is wrong with it."""

    @abstractmethod
    def write(
        self,
        directory: Path,
        *,
        config: Any,
        weights: Mapping[str, Tensor],
        ema: Mapping[str, Tensor] | None,
        step: int,
        tokenizer: Any,
    ) -> Path:
        """Write a model in this layout under ``directory`` and return the path :meth:`read` takes.

        Args:
            directory: created if missing.
            config: the validated :class:`cdlm.config.RunConfig` the weights were built with.
            weights: ``Method.modules()`` state dict (raw weights).
            ema: EMA shadows of the trainable weights, or None (the raw weights stand in for them).
            step: training step to record.
            tokenizer: the run's ``PreTrainedTokenizerBase`` (a layout that ships its tokenizer writes it).
        """


@dataclass(frozen=True)
class MethodSpec:
    """What a plugin registers under the entry-point group ``cdlm.plugins``.

    Attributes:
        name: unique method name used in recipes (``method: elf``).
        description: one line for ``cdlm recipes list`` and error messages.
        config_cls: pydantic model that validates the recipe's ``model:`` section.
        sample_config_cls: the method's sampling settings, which validate the recipe's ``sample:`` section: a
            :class:`~cdlm.config.SampleConfig` subclass adding what only this method reads (and its defaults);
            a setting it does not declare is rejected. ``cdlm recipes show`` prints it.
        build: ``(run_config) → Method``, reading ``run_config.model`` (an instance of ``config_cls``) and any core
            section it needs; must work on the meta device (no data-dependent work).
        released_formats: released checkpoint layouts that ``cdlm.load_pretrained``, ``cdlm sample --checkpoint``
            and ``cdlm convert`` read as they are (first match wins).
        check: cross-section rules, ``(run_config) → [(dotted fields involved, problem)]``, run when a recipe is
            validated (before any data is prepared) and again when the method is built (:func:`cdlm.build`);
            e.g. ELF's ``data.seq_len`` must equal ``model.max_length``.
    """

    name: str
    description: str
    config_cls: type[BaseModel]
    build: Callable[[Any], Method]
    released_formats: Sequence[ReleasedFormat] = ()
    check: Callable[[Any], Sequence[tuple[tuple[str, ...], str]]] | None = None
    sample_config_cls: type[SampleConfig] = SampleConfig
