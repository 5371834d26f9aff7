"""Cola generation: block-wise flow matching over VAE latents with repaint and CFG (Cola spec §5, §6, §7).

This is the reference's ``generate_task_repaint_inference`` (spec §6.1), step for step: per-sample padding to
a block multiple, prefix encoding (posterior mode, scaled), repaint of a prompt tail that ends inside a
block, DiT and VAE prefill, then per block one call of the core :func:`~cdlm.sampling.solvers.integrate`
(its ``constrain`` re-pins the repainted latents), a decode that commits the block to the VAE cache, token
selection and a commit to the DiT cache at t = 0. A batch's caches live in the
:class:`~cdlm_cola.components.ColaGenerationState` that generation creates and passes explicitly, never on the
networks, so generations that share one model may interleave. Three things differ from the reference, and
none changes the tokens (latents agree to fp32 rounding): the conditional and unconditional CFG rows run as
one batched DiT forward; the DiT calls of a block share one plan (mask, RoPE tables and the history laid out
with its keys rotated, made once; timestep embedding and AdaLN once per distinct timestep, see
:meth:`~cdlm_cola.dit.ColaDiT.plan`); and the final block's DiT commit (whose keys nothing reads) is skipped.
The reference's own way (two CFG passes, per-call DiT work) and a run without KV caches are not library code:
``benchmarks/cola_reference.py`` holds them, the tests check them against this path and the benchmarks time it.

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
from dataclasses import dataclass

import torch
from torch import Tensor

from cdlm.errors import DataError
from cdlm.interfaces import GenerateOutput, GenerateRequest, Pipeline
from cdlm.sampling import grids
from cdlm.sampling.guidance import classifier_free
from cdlm.sampling.solvers import integrate
from cdlm.sampling.tokens import select_tokens
from cdlm.sampling.types import DenoiseFn, PredictFn, Prediction, StepCallback
from cdlm_cola.components import ColaCond, ColaDecoder, ColaDenoiser, ColaEmbedder, ColaGenerationState
from cdlm_cola.config import ColaConfig, ColaSampleConfig
from cdlm_cola.layout import BlockPlan
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


def cola_denoise_fn(denoiser: ColaDenoiser, schedule: ColaSchedule) -> DenoiseFn:
    """Return Cola's DenoiseFn for one block: the DiT on one block per row, read as a core-time Prediction.

    It plans each set of rows (each ``cond`` object) at its first call (:meth:`ColaDenoiser.plan`) and reuses
    that plan at every later call: make one per block, since a plan holds the history as it was.
    """
    plans: dict[int, tuple[ColaCond, BlockPlan]] = {}  # id(cond) → (cond, kept so the id stays its; plan)

    def denoise(z: Tensor, t: Tensor, x_prev: Tensor, cond: ColaCond) -> Prediction:
        if id(cond) not in plans:
            plans[id(cond)] = (cond, denoiser.plan(cond))
        return schedule.predict(denoiser(z, t, cond, plan=plans[id(cond)][1]), z, t)

    return denoise


class ColaPipeline(Pipeline):
    """Prompt continuation with Cola, in batches of ``settings.batch_size`` prompts, on the method's components.

    Args:
        cfg: the Cola model section (token ids, ``per_sample_noise_seed``, ``time_scale``).
        embedder: encodes the prompts.
        denoiser: the DiT prior.
        schedule: reads the DiT's output as a core-time prediction.
        decoder: decodes the blocks.
    """

    def __init__(
        self,
        cfg: ColaConfig,
        *,
        embedder: ColaEmbedder,
        denoiser: ColaDenoiser,
        schedule: ColaSchedule,
        decoder: ColaDecoder,
    ) -> None:
        self.cfg, self.embedder, self.denoiser, self.schedule, self.decoder = cfg, embedder, denoiser, schedule, decoder
        self.vae_cfg, self.block_size = decoder.vae.config, denoiser.dit.config.block_size

    @torch.no_grad()
    def __call__(
        self, request: GenerateRequest, generator: torch.Generator, on_step: StepCallback | None = None
    ) -> GenerateOutput:
        """Continue ``request.prompts`` (token ids; None: ``num_samples`` empty prompts) by whole blocks.

        Each output keeps the ids after its prompt, special tokens included and not cut at EOS (spec §6.1
        step 8), and ``text_ends`` marks its first EOS or im_end; generation stops early only when every row of
        a batch has emitted one. ``nfe``
        counts the solver's prediction calls (one per Euler step, however CFG is batched), the block decodes
        and the DiT commits; the prefill is not counted.

        Raises:
            DataError: an empty prompt list, a count that differs from ``num_samples``, a prompt plus
                ``max_new_tokens`` longer than ``model.max_length``, a token id outside the VAE vocabulary (a
                tokenizer mismatch).
        """
        settings: ColaSampleConfig = request.settings
        prompts = self._check(request)
        sample_ids = request.sample_ids or [None] * len(prompts)
        ids: list[list[int]] = []
        nfe = 0
        for start in range(0, len(prompts), settings.batch_size):
            rows = slice(start, start + settings.batch_size)
            batch_ids, batch_nfe = self._generate(prompts[rows], sample_ids[rows], settings, generator, on_step)
            ids.extend(batch_ids)
            nfe += batch_nfe
        stops = {i for i in (self.cfg.eos_id, self.cfg.im_end_id) if i is not None}
        ends = [next((k for k, token in enumerate(row) if token in stops), len(row)) for row in ids]
        return GenerateOutput(ids=ids, nfe=nfe, text_ends=ends)

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
        device = self._device()
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

    def _generate(
        self,
        prompts: list[list[int]],
        sample_ids: Sequence[int | str | None],
        settings: ColaSampleConfig,
        generator: torch.Generator,
        on_step: StepCallback | None,
    ) -> tuple[list[list[int]], int]:
        """Generate one batch (spec §6.1 steps 6–8); return the trimmed ids per row and the forwards spent."""
        bs, ps, device = self.block_size, self.vae_cfg.patch_size, self._device()
        plan = self.plan(prompts, settings.max_new_tokens)
        num_blocks = 1 if plan.one_block else math.ceil(settings.max_new_tokens / (bs * ps))
        prefix_lens = [p.shape[0] for p in plan.prefix]
        state = self.start(plan.prefix)
        stop_ids = [i for i in (self.cfg.eos_id, self.cfg.im_end_id) if i is not None]
        stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
        tokens = torch.zeros(len(prompts), 0, dtype=torch.long, device=device)  # (B, P) sampled so far
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        nfe = 0
        for step in range(num_blocks):
            pinned, clean = (plan.pinned, plan.clean) if step == 0 else (None, None)
            cond = state.cond(pinned, clean)
            scale = self._scale(settings.guidance, prefix_lens if step == 0 else None)
            noise = self._noise(sample_ids, step, generator)  # (B, bs, C)
            z, block_ids, block_nfe = self._block(state, cond, scale, noise, tokens, settings, generator, on_step)
            tokens = torch.cat([tokens, block_ids], dim=1)
            done |= torch.isin(block_ids, stops).any(dim=1)
            nfe += block_nfe
            if done.all() or step == num_blocks - 1:
                break
            nfe += state.commit(z)  # to the DiT cache at t = 0 (spec §6.1 step 7.6)
        return [row[n:] for row, n in zip(tokens.tolist(), plan.trim, strict=True)], nfe

    def start(self, prefix: Sequence[Tensor]) -> ColaGenerationState:
        """Create a batch's generation state, its prefix latents (n_i, C) per sample prefilled (spec §6.1 step 6)."""
        return ColaGenerationState(self.denoiser, self.decoder, prefix)

    def denoise_fn(self) -> DenoiseFn:
        """Return the DenoiseFn of one block (:func:`cola_denoise_fn`); a fresh one per block."""
        return cola_denoise_fn(self.denoiser, self.schedule)

    def guide(self, denoise: DenoiseFn, cond: ColaCond, scale: float | Tensor) -> PredictFn:
        """Return the guided prediction of a block: CFG over one forward of 2B rows (spec §5)."""
        return classifier_free(denoise, cond, scale)

    def _block(
        self,
        state: ColaGenerationState,
        cond: ColaCond,
        scale: float | Tensor,
        noise: Tensor,
        tokens: Tensor,
        settings: ColaSampleConfig,
        generator: torch.Generator,
        on_step: StepCallback | None,
    ) -> tuple[Tensor, Tensor, int]:
        """Integrate one block from noise (B, bs, C), decode it (a VAE cache commit) and select its tokens.

        Returns:
            The block's final latents (B, bs, C), its token ids (B, bs·ps) and the forwards spent.
        """
        out = integrate(
            self.guide(self.denoise_fn(), cond, scale),
            cond.restore(noise),
            grids.uniform(settings.steps),
            method=settings.sampler,
            generator=generator,
            constrain=cond.restore,
            on_step=on_step,
        )
        logits = state.decode(out.z)  # (B, bs·ps, V)
        block_ids = select_tokens(
            logits,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            repetition_penalty=settings.repetition_penalty,
            previous_ids=tokens if tokens.shape[1] else None,  # previous blocks only (H7)
            generator=generator,
        )  # (B, bs·ps)
        return out.z, block_ids, out.nfe + 1

    def _scale(self, guidance: float, prefix_lens: list[int] | None) -> float | Tensor:
        """Return the CFG scale: per row in the first block, where a row with an empty prefix gets 1 (spec §5)."""
        if prefix_lens is None or all(prefix_lens):
            return guidance
        scales = [guidance if n else 1.0 for n in prefix_lens]
        if len(set(scales)) == 1:
            return scales[0]
        return torch.tensor(scales, dtype=torch.float32, device=self._device())  # (B,)

    def _noise(self, sample_ids: Sequence[int | str | None], step: int, generator: torch.Generator) -> Tensor:
        """Draw the block noise (B, bs, C) fp32 on the generator's device, then move it (spec §6.1 step 7.1)."""
        shape = (self.block_size, self.vae_cfg.latent_dim)
        seed = self.cfg.per_sample_noise_seed
        if seed is None:
            eps = torch.randn((len(sample_ids), *shape), generator=generator, device=generator.device)
        else:
            eps = torch.stack(
                [
                    torch.randn(
                        shape,
                        generator=_seeded(seed + noise_key(sid, row) * 1_000 + step * 10_000_000, generator.device),
                        device=generator.device,
                    )
                    for row, sid in enumerate(sample_ids)
                ]
            )
        return eps.to(self._device())

    def _check(self, request: GenerateRequest) -> list[list[int]]:
        if request.sample_ids is not None and len(request.sample_ids) != request.num_samples:
            raise DataError(
                f"Cola generation: got {len(request.sample_ids)} sample ids for num_samples={request.num_samples}; "
                "expected one each"
            )
        if request.prompts is None:
            return [[] for _ in range(request.num_samples)]
        prompts = [list(p) for p in request.prompts]
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
        return prompts

    def _device(self) -> torch.device:
        return next(self.denoiser.dit.parameters()).device


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
