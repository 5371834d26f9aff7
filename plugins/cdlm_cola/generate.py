"""Cola generation: block-wise flow matching over VAE latents with repaint and CFG (Cola spec §5, §6, §7).

:class:`ColaPipeline` is a :class:`~cdlm.pipeline.FlowPipeline`: batching, the time grid, the integration with
the shared solver under the core's classifier-free guidance and the hooks that drive it are the core's. What
Cola changes is the batch step (:meth:`ColaPipeline.generate_batch`), the reference's
``generate_task_repaint_inference`` (spec §6.1) step for step: per-sample padding to a block multiple, prefix
encoding (posterior mode, scaled), repaint of a prompt tail that ends inside a block, DiT and VAE prefill, then
per block the core's step — noise, :meth:`~ColaPipeline.predictor` integrated under
:meth:`~ColaPipeline.constrain` (the repaint), :meth:`~ColaPipeline.decode` (a VAE cache commit, then tokens with
the repetition penalty) — and a commit to the DiT cache at t = 0. A batch's caches live in the
:class:`~cdlm_cola.components.ColaGenerationState` that generation creates and passes explicitly, never on the
networks, so generations that share one model may interleave. Three things differ from the reference, and
none changes the tokens (latents agree to fp32 rounding): the conditional and unconditional CFG rows run as
one batched DiT forward; the DiT calls of a block share one plan (mask, RoPE tables and the history laid out
with its keys rotated, made once; timestep embedding and AdaLN once per distinct timestep, see
:meth:`~cdlm_cola.dit.ColaDiT.plan`); and the final block's DiT commit (whose keys nothing reads) is skipped.
The reference's own way (two CFG passes, per-call DiT work) and a run without KV caches are not library code:
``benchmarks/cola_reference.py`` holds them (through the same hooks), the tests check them against this path
and the benchmarks time it.

Random draws, in order, per batch: each block's noise, then its token draws (temperature > 0). With
``model.per_sample_noise_seed`` S, the block-k noise of a sample with id ``sid`` comes from its own generator
seeded ``S + sid·1000 + k·10_000_000``, created on ``generator``'s device (spec §6.1 step 7.1). ``sid`` is the
sample's id (``GenerateRequest.sample_ids``, the ``id`` field of a prompts file) as ``int(id)``, or
``crc32(str(id))`` when it is not a number; a sample without an id falls back to its row in its batch of
``sample.batch_size``, as the reference does. With ids a sample's output does not depend on its batch.
Otherwise every draw comes from ``generator`` in the reference's global-RNG order.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from cdlm.errors import DataError
from cdlm.interfaces import GenerateOutput, GenerateRequest
from cdlm.pipeline import Constrain, FlowPipeline, time_grid
from cdlm.sampling.guidance import classifier_free
from cdlm.sampling.solvers import integrate
from cdlm.sampling.tokens import select_tokens
from cdlm.sampling.types import PredictFn, Prediction, StepCallback
from cdlm_cola.components import ColaCond, ColaDecoder, ColaDenoiser, ColaEmbedder, ColaGenerationState
from cdlm_cola.config import ColaConfig, ColaSampleConfig
from cdlm_cola.schedule import ColaSchedule


@dataclass(frozen=True)
class PromptPlan:
    """How a batch of prompts becomes a prefix and a first block (spec §6.1 steps 2–5).

    Attributes:
        prefix: per sample, (n_i, C) scaled latents of its complete prompt blocks (n_i may be 0).
        pinned: (B, bs) bool, the prompt-tail positions of the first block (repaint), or None if no sample has any.
        clean: (B, bs, C) the first block's clean latents (read only where pinned).
        trim: per sample, the re-decoded prompt tokens at the start of the output, dropped at the end.
        one_block: ``max_new_tokens`` is below the free positions of some sample's repainted first block, so
            only that block is generated (the reference's ``force_complete_prefix_only``).
    """

    prefix: list[Tensor]
    pinned: Tensor | None
    clean: Tensor
    trim: list[int]
    one_block: bool


def guidance_scale(cond: ColaCond, guidance: float) -> float | Tensor:
    """Return the CFG scale of each row of ``cond``: ``guidance``, but 1 where a row has no history (spec §5).

    Only a first block has such rows (a prompt without a complete block, or none); the reference turns their
    guidance off. Returns a number when every row has the same scale, else a (B,) fp32 tensor.
    """
    scales = [guidance if n else 1.0 for n in cond.cached]
    return scales[0] if len(set(scales)) == 1 else torch.tensor(scales)  # (B,)


class ColaPipeline(FlowPipeline):
    """Prompt continuation with Cola, in batches of ``settings.batch_size`` prompts, on the method's components.

    Args:
        cfg: the Cola model section (token ids, ``per_sample_noise_seed``, ``max_length``).
        embedder: encodes the prompts.
        denoiser: the DiT prior.
        schedule: reads the DiT's output as a core-time prediction.
        decoder: decodes the blocks.
    """

    decoder_calls = 1  # one VAE decode per block, which also commits it to the decoder's cache

    def __init__(
        self,
        cfg: ColaConfig,
        *,
        embedder: ColaEmbedder,
        denoiser: ColaDenoiser,
        schedule: ColaSchedule,
        decoder: ColaDecoder,
    ) -> None:
        vae_cfg, block_size = decoder.vae.config, denoiser.dit.config.block_size
        # latent_shape: one block (bs, C), the latents generated per row at a time
        super().__init__(denoiser, schedule, decoder, (block_size, vae_cfg.latent_dim))
        self.cfg, self.embedder, self.decoder = cfg, embedder, decoder
        self.vae_cfg, self.block_size = vae_cfg, block_size

    def __call__(
        self, request: GenerateRequest, generator: torch.Generator, on_step: StepCallback | None = None
    ) -> GenerateOutput:
        """Continue ``request.prompts`` (token ids; None: ``num_samples`` empty prompts) by whole blocks.

        Each output keeps the ids after its prompt, special tokens included and not cut at EOS (spec §6.1
        step 8), and ``text_ends`` marks its first EOS or im_end; generation stops early only when every row of
        a batch has emitted one. ``nfe`` counts the solver's prediction calls (one per Euler step, however CFG is
        batched), the block decodes and the DiT commits; the prefill is not counted.

        Raises:
            DataError: an empty prompt list, a count that differs from ``num_samples``, a prompt plus
                ``max_new_tokens`` longer than ``model.max_length``, a token id outside the VAE vocabulary (a
                tokenizer mismatch).
        """
        out = super().__call__(request, generator, on_step)
        stops = self._stop_ids()
        ends = [next((k for k, token in enumerate(row) if token in stops), len(row)) for row in out.ids]
        return replace(out, text_ends=ends)

    def check(self, request: GenerateRequest) -> None:
        """Refuse a request this pipeline cannot serve, before any work (see :meth:`__call__` for what)."""
        if request.sample_ids is not None and len(request.sample_ids) != request.num_samples:
            raise DataError(
                f"Cola generation: got {len(request.sample_ids)} sample ids for num_samples={request.num_samples}; "
                "expected one each"
            )
        if request.prompts is None:
            return
        prompts = request.prompts
        if not prompts:
            raise DataError("Cola generation: the prompt list is empty; pass at least one prompt (or None)")
        if len(prompts) != request.num_samples:
            raise DataError(
                f"Cola generation: got {len(prompts)} prompts for num_samples={request.num_samples}; expected one each"
            )
        longest = max(len(p) for p in prompts) + request.settings.max_new_tokens
        if longest > self.cfg.max_length:
            raise DataError(
                f"sample.max_new_tokens={request.settings.max_new_tokens} (--max-new-tokens): the longest prompt plus "
                f"the new tokens is {longest} tokens, above model.max_length={self.cfg.max_length}; ask for fewer "
                "tokens (or raise model.max_length)"
            )
        vocab = self.vae_cfg.vocab_size
        for i, prompt in enumerate(prompts):
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise DataError(
                    f"Cola generation: prompt {i} has token ids {bad[:8]} outside [0, {vocab}), the VAE vocabulary "
                    "(model.vae.vocab_size); was it tokenized with another tokenizer than data.tokenizer?"
                )

    def plan(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> PromptPlan:
        """Pad, encode and split prompts into prefixes and a first block (spec §6.1 steps 2–5).

        Each prompt is padded with ``pad_id`` to a multiple of ``patch_size·block_size`` tokens and encoded
        (the encoder sees the pads). A latent holding a prompt token is a prompt latent; with m of them and
        ``m mod bs ≠ 0`` the last partial block becomes the first generated block, its prompt latents pinned.

        Args:
            prompts: token ids per sample (may be empty).
            max_new_tokens: the generation budget, for the one-block rule.
        """
        bs, ps, dim = self.block_size, self.vae_cfg.patch_size, self.vae_cfg.latent_dim
        device = self.device()
        chunk = ps * bs
        padded = [list(p) + [self.cfg.pad_id] * (-len(p) % chunk) for p in prompts]
        rows = [torch.tensor(p, device=device) for p in padded if p]
        encoded = iter(self.embedder.encode(rows) if rows else [])
        latents = [next(encoded) if p else torch.zeros(0, dim, device=device) for p in padded]
        prefix, trim = [], []
        pinned = torch.zeros(len(prompts), bs, dtype=torch.bool, device=device)
        clean = torch.zeros(len(prompts), bs, dim, device=device)
        one_block = False
        for i, (prompt, lat) in enumerate(zip(prompts, latents, strict=True)):
            num_prompt = math.ceil(len(prompt) / ps)  # latents holding a prompt token
            start = num_prompt // bs * bs
            prefix.append(lat[:start])
            trim.append(len(prompt) - start * ps if num_prompt % bs else 0)
            if num_prompt % bs:
                pinned[i, : num_prompt - start] = True
                clean[i] = lat[start : start + bs]
                one_block |= max_new_tokens < bs - num_prompt % bs
        return PromptPlan(prefix, pinned if pinned.any() else None, clean, trim, one_block)

    def generate_batch(
        self, request: GenerateRequest, rows: slice, generator: torch.Generator, on_step: StepCallback | None
    ) -> tuple[list[list[int]], int]:
        """Generate one batch block by block (spec §6.1 steps 2–8); return the trimmed ids per row and the nfe.

        Each block is the core's batch step on one block per row: the time grid, the noise, the rollout of
        :meth:`predictor` under :meth:`constrain` from the noise, then :meth:`decode`.
        """
        settings: ColaSampleConfig = request.settings
        size = rows.stop - rows.start
        prompts = [[] for _ in range(size)] if request.prompts is None else request.prompts[rows]
        sample_ids = [None] * size if request.sample_ids is None else request.sample_ids[rows]
        plan = self.plan(prompts, settings.max_new_tokens)
        block_tokens = self.block_size * self.vae_cfg.patch_size
        num_blocks = 1 if plan.one_block else math.ceil(settings.max_new_tokens / block_tokens)
        state = self.start(plan.prefix)
        stops = torch.tensor(sorted(self._stop_ids()), dtype=torch.long, device=self.device())
        done = torch.zeros(size, dtype=torch.bool, device=self.device())
        nfe = 0
        for block in range(num_blocks):
            cond = state.cond(plan.pinned, plan.clean) if block == 0 else state.cond()
            grid = time_grid(settings, generator)
            constrain = self.constrain(cond)
            out = integrate(  # as the core's rollout does; Cola's settings have no SDE sampler, so no churn
                self.predictor(cond, settings),
                constrain(self._noise(sample_ids, block, generator)),  # (B, bs, C)
                grid,
                method=settings.sampler,
                generator=generator,
                constrain=constrain,
                on_step=on_step,
            )
            block_ids = self.decode(out.z, cond, settings, generator)  # (B, bs·ps)
            state.record(block_ids)
            done |= torch.isin(block_ids, stops).any(dim=1)
            nfe += out.nfe + self.decoder_calls
            if done.all() or block == num_blocks - 1:
                break
            nfe += state.commit(out.z)  # to the DiT cache at t = 0 (spec §6.1 step 7.6)
        assert state.ids is not None
        return [row[n:] for row, n in zip(state.ids.tolist(), plan.trim, strict=True)], nfe

    def start(self, prefix: Sequence[Tensor]) -> ColaGenerationState:
        """Create a batch's generation state, its prefix latents (n_i, C) per sample prefilled (spec §6.1 step 6)."""
        return ColaGenerationState(self.denoiser, self.decoder, prefix)

    def denoise(self, z: Tensor, t: Tensor, x_prev: Tensor, cond: ColaCond) -> Prediction:
        """The DiT on one block per row through the rows' plan (:attr:`ColaCond.block_plan`), read as a Prediction."""
        return self.schedule.predict(self.denoiser(z, t, cond, plan=cond.block_plan), z, t)

    def predictor(self, cond: ColaCond, settings: ColaSampleConfig) -> PredictFn:
        """Return :meth:`denoise` under CFG, one forward of 2B rows; rows with no history unguided (spec §5)."""
        return classifier_free(self.denoise, cond, guidance_scale(cond, settings.guidance))

    def constrain(self, cond: ColaCond) -> Constrain:
        """Return ``cond.restore``: the repainted prompt positions stay at their clean latents (spec §6.1 step 7.2)."""
        return cond.restore

    def decode(self, z: Tensor, cond: ColaCond, settings: ColaSampleConfig, generator: torch.Generator) -> Tensor:
        """Return the block's token ids (B, bs·ps) for its final latents z (B, bs, C).

        The VAE decode commits the block to the decoder's cache (spec §6.1 step 7.3); tokens are selected with
        the repetition penalty on the ids of the previous blocks only (spec §7, hazard H7).
        """
        state = cond.state
        assert state is not None  # every block reads its batch's state
        return select_tokens(
            state.decode(z),  # (B, bs·ps, V)
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty,
            previous_ids=state.ids,  # the previous blocks' (the loop records this block's after)
            generator=generator,
        )  # (B, bs·ps)

    def _noise(self, sample_ids: Sequence[int | str | None], block: int, generator: torch.Generator) -> Tensor:
        """Draw the block noise (B, bs, C) fp32 on the generator's device, then move it (spec §6.1 step 7.1)."""
        seed = self.cfg.per_sample_noise_seed
        if seed is None:
            eps = torch.randn((len(sample_ids), *self.latent_shape), generator=generator, device=generator.device)
        else:
            eps = torch.stack(
                [
                    torch.randn(
                        self.latent_shape,
                        generator=_seeded(seed + noise_key(sid, row) * 1_000 + block * 10_000_000, generator.device),
                        device=generator.device,
                    )
                    for row, sid in enumerate(sample_ids)
                ]
            )
        return eps.to(self.device())

    def _stop_ids(self) -> set[int]:
        return {i for i in (self.cfg.eos_id, self.cfg.im_end_id) if i is not None}


def noise_key(sample_id: int | str | None, row: int) -> int:
    """Return the reference's per-sample seed key: ``int(id)``, ``crc32(str(id))`` if not a number, else ``row``."""
    if sample_id is None:
        return row
    try:
        return int(sample_id)
    except (TypeError, ValueError):
        return zlib.crc32(str(sample_id).encode("utf-8")) & 0xFFFFFFFF


def _seeded(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
