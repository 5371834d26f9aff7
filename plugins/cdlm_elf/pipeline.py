"""ELF generation (ELF spec §4–5): the core pipeline, extended by ELF's condition pinning, SC-CFG and EOS cuts.

:class:`ElfPipeline` is a :class:`~cdlm.pipeline.FlowPipeline`: batching, the time grid, z₀, the SDE/ODE rollout
with classifier-free guidance and the decode at t = 1 are the core's. ELF changes what differs: seq2seq sources
are encoded into clean condition latents that stay pinned through the rollout (inputs and outputs of every
network call, and the state after every step); the self-conditioning guidance scale w travels in the
conditioning (SC-CFG tokens, no extra forward); greedy decoding skips the full fp32 logits; rows are cut at
their first EOS.

Every draw comes from the one explicit generator, in this order per batch: the time grid, z₀, then the
per-step SDE noise (then token sampling when the temperature is positive). The reference draws the grid
from the global RNG instead (spec §4.3 step 5); a fixture replays its recorded grid through
:func:`cdlm.pipeline.rollout`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdlm.errors import DataError
from cdlm.interfaces import Embedder, GenerateRequest, TokenBatch
from cdlm.pipeline import Constrain, FlowPipeline, decode_tokens
from cdlm.sampling.guidance import classifier_free
from cdlm.sampling.tokens import GREEDY_BELOW
from cdlm.sampling.types import DenoiseFn, PredictFn, Prediction
from cdlm_elf.conditioning import ElfCond
from cdlm_elf.config import ElfConfig, ElfSampleConfig
from cdlm_elf.model import ElfDecoder, ElfDenoiser
from cdlm_elf.schedule import ElfSchedule


def elf_denoise_fn(denoiser: ElfDenoiser, schedule: ElfSchedule) -> DenoiseFn:
    """Return ELF's DenoiseFn ``F(z, t, x_prev, cond)`` (spec §4.2 steps 1–2).

    Condition positions are pinned on the inputs (z and x_prev take the condition latents) and on the outputs
    (x̂ = condition latents, v̂ = 0). SC-CFG needs no extra forward: its scale w travels in ``cond.sc_scale``.
    """

    def denoise(z: Tensor, t: Tensor, x_prev: Tensor, cond: ElfCond) -> Prediction:
        z = cond.restore(z)
        out = denoiser(z, t, cond, self_cond=cond.restore(x_prev))  # (B, L, C) x-prediction
        return _pin(schedule.predict(out, z, t), cond)

    return denoise


def _pin(pred: Prediction, cond: ElfCond) -> Prediction:
    """Pin condition positions of a prediction: x̂ = the condition latents, v̂ = 0 (spec §4.2 step 2)."""
    return Prediction(x=cond.restore(pred.x), v=cond.restore(pred.v, 0.0))


def guided(denoise: DenoiseFn, cond: ElfCond, guidance: float) -> PredictFn:
    """Return the rollout's PredictFn: classifier-free guidance when conditional, re-pinned (spec §4.2 step 3).

    Unconditional rows have no null branch to contrast (the reference forces cfg = 1 there), so the scale
    only applies when ``cond`` carries a condition.
    """
    predict = classifier_free(denoise, cond, guidance if cond.mask is not None else 1.0)

    def pinned(z: Tensor, t: Tensor, x_prev: Tensor) -> Prediction:
        return _pin(predict(z, t, x_prev), cond)

    return pinned


def decode(
    decoder: ElfDecoder, z: Tensor, cond: ElfCond, settings: ElfSampleConfig, generator: torch.Generator
) -> Tensor:
    """Return token ids (B, L) for the final state z (B, L, C): decoder logits at t = 1, then token selection.

    Temperature 0 is the reference's argmax (spec §4.3 step 4), taken by ``decoder.greedy`` without computing
    every fp32 logit (same ids; ``greedy_linear``); otherwise the core's :func:`~cdlm.pipeline.decode_tokens`.
    """
    if settings.temperature < GREEDY_BELOW:
        return decoder.greedy(z, cond)
    return decode_tokens(decoder, z, cond, settings, generator)


def mask_after_eos(ids: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Replace every position at or after the first ``eos_id`` of each row of ids (B, L) by ``pad_id`` (§4.5)."""
    return ids.masked_fill((ids == eos_id).cumsum(dim=-1) > 0, pad_id)


def postprocess(ids: Tensor, source_lengths: list[int] | None, *, eos_id: int, pad_id: int) -> list[list[int]]:
    """Turn decoded ids (B, L) into one list per row (spec §4.5, §5).

    Unconditional rows (``source_lengths`` None) keep all L positions, padded from the first EOS on. A seq2seq
    row with n source tokens keeps the L − n positions after them, EOS-filled from the first EOS on.
    """
    if source_lengths is None:
        return mask_after_eos(ids, eos_id, pad_id).tolist()
    return [mask_after_eos(ids[i, n:][None], eos_id, eos_id)[0].tolist() for i, n in enumerate(source_lengths)]


class ElfPipeline(FlowPipeline):
    """Unconditional or seq2seq generation with an ELF network.

    Unconditional rows are masked after their first EOS (pad); a seq2seq row returns the L − n positions after its
    n source tokens, EOS-filled after the first EOS (spec §5). ``nfe`` counts every network call, the decoder's
    included.

    Args:
        cfg: the ELF model config (``max_length`` L, ``latent_dim`` C).
        denoiser: the network as a Denoiser.
        decoder: the same network in decode mode.
        schedule: ELF's flow schedule (x-prediction → velocity; its ``noise_scale`` is the noise end).
        embedder: encodes seq2seq sources (prompts) into condition latents.
        eos_id: end-of-sequence id of the tokenizer (T5: 1).
        pad_id: padding id of the tokenizer (T5: 0).
        conditional: whether the network was trained with sources (``data.source_field`` set); prompts and
            classifier-free guidance are refused otherwise.
    """

    decoder_calls = 1  # the decoder is the denoiser's network in decode mode

    def __init__(
        self,
        cfg: ElfConfig,
        denoiser: ElfDenoiser,
        decoder: ElfDecoder,
        schedule: ElfSchedule,
        embedder: Embedder,
        *,
        eos_id: int = 1,
        pad_id: int = 0,
        conditional: bool = True,
    ) -> None:
        super().__init__(denoiser, schedule, decoder, (cfg.max_length, cfg.latent_dim))
        self.cfg, self.decoder, self.embedder, self.conditional = cfg, decoder, embedder, conditional
        self.eos_id, self.pad_id = eos_id, pad_id
        self._denoise = elf_denoise_fn(denoiser, schedule)

    def check(self, request: GenerateRequest) -> None:
        """Refuse bad prompts and guidance before any work.

        Raises:
            DataError: the prompts do not match ``num_samples``, a source does not leave room to generate, prompts
                for a model trained without sources, or a CFG scale with nothing to condition on.
        """
        self._check_prompts(request.num_samples, request.prompts)
        self._check_guidance(request.prompts, request.settings.guidance)

    def condition(self, size: int, prompts: list[list[int]] | None, settings: ElfSampleConfig) -> ElfCond:
        """Return the ElfCond of ``size`` rows: SC-CFG scale w, plus the sources encoded at positions [0, n) if any.

        Args:
            size: number of rows B.
            prompts: B lists of source token ids (seq2seq), or None (unconditional).
            settings: the sample settings; ``self_cond_scale`` is the SC-CFG scale w of every row.
        """
        device = self.device()
        w = torch.full((size,), settings.self_cond_scale, dtype=torch.float32, device=device)  # (B,)
        if prompts is None:
            return ElfCond(w)
        L = self.cfg.max_length
        ids = torch.full((size, L), self.pad_id, dtype=torch.long)
        for row, source in enumerate(prompts):
            ids[row, : len(source)] = torch.tensor(source, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in prompts])
        is_source = torch.arange(L)[None] < lengths[:, None]  # (B, L)
        # the encoder mask lets condition tokens see only the condition (spec §5), so the rest is irrelevant
        values = self.embedder(TokenBatch(ids, is_source, is_source).to(device))  # (B, L, C)
        return ElfCond(w, values.float(), is_source.to(device))

    def denoise(self, z: Tensor, t: Tensor, x_prev: Tensor, cond: ElfCond) -> Prediction:
        """ELF's DenoiseFn (:func:`elf_denoise_fn`): condition positions pinned, x_prev as self-conditioning."""
        return self._denoise(z, t, x_prev, cond)

    def predictor(self, cond: ElfCond, settings: ElfSampleConfig) -> PredictFn:
        """Return :func:`guided`: classifier-free guidance on the source, re-pinned."""
        return guided(self.denoise, cond, settings.guidance)

    def constrain(self, cond: ElfCond) -> Constrain:
        """Return ``cond.restore``: condition positions stay at their clean latents (spec §4.3)."""
        return cond.restore

    def decode(self, z: Tensor, cond: ElfCond, settings: ElfSampleConfig, generator: torch.Generator) -> Tensor:
        """Return token ids (B, L) from the decoder at t = 1 (:func:`decode`)."""
        return decode(self.decoder, z, cond, settings, generator)

    def postprocess(self, tokens: Tensor, prompts: list[list[int]] | None) -> list[list[int]]:
        """Cut each row at its first EOS; a seq2seq row keeps the positions after its source (:func:`postprocess`)."""
        lengths = None if prompts is None else [len(s) for s in prompts]
        return postprocess(tokens, lengths, eos_id=self.eos_id, pad_id=self.pad_id)

    def _check_guidance(self, prompts: list[list[int]] | None, guidance: float) -> None:
        if prompts is not None and not self.conditional:
            raise DataError(
                "prompts (--prompt, --prompts-file): this ELF model was trained without sources (data.source_field "
                "is unset), so it cannot condition on a prompt; sample unconditionally with --num-samples, or set "
                "data.source_field for a seq2seq checkpoint"
            )
        if prompts is None and guidance != 1.0:
            raise DataError(
                f"sample.guidance={guidance} (--guidance): classifier-free guidance contrasts a prompt with its "
                "absence, and this request has no prompts (unconditional ELF generation); drop --guidance or leave it "
                "at 1"
            )

    def _check_prompts(self, num_samples: int, prompts: list[list[int]] | None) -> None:
        if prompts is None:
            return
        if len(prompts) != num_samples:
            raise DataError(
                f"ELF generation: got {len(prompts)} prompts for num_samples={num_samples}; expected one each"
            )
        L = self.cfg.max_length
        too_long = [i for i, p in enumerate(prompts) if len(p) >= L]
        if too_long:
            raise DataError(
                f"ELF generation: prompts {too_long[:8]} have ≥ model.max_length={L} source tokens; a source must "
                f"leave room to generate (at most {L - 1} tokens)"
            )
