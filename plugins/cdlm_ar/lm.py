"""The baseline's network, loss and sampler: a ``transformers`` GPT-2 trained by next-token cross-entropy.

Rows come from the shared packer (documents joined by EOS), so EOS also starts a document: unconditional
samples begin from it, exactly as GPT-2 samples begin from ``<|endoftext|>``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GPT2Config, GPT2LMHeadModel

from cdlm.errors import DataError
from cdlm.interfaces import GenerateOutput, GenerateRequest, LossOutput, Objective, Pipeline, TokenBatch
from cdlm.sampling.tokens import select_tokens
from cdlm.sampling.types import StepCallback
from cdlm_ar.config import ArConfig, ArSampleConfig


def gpt2(cfg: ArConfig, generator: torch.Generator | None = None) -> GPT2LMHeadModel:
    """Build the GPT-2 of ``cfg`` (tied input/output embeddings); initialised from ``generator`` when given."""
    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_length,
        n_embd=cfg.hidden_size,
        n_layer=cfg.depth,
        n_head=cfg.num_heads,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=cfg.eos_id,
        eos_token_id=cfg.eos_id,
        pad_token_id=cfg.pad_id,
    )
    model = GPT2LMHeadModel(config)
    if generator is not None and torch.empty(0).device.type != "meta":  # GPT-2's init, from our generator
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias") or ".ln_" in name or name.startswith("transformer.ln_f"):
                    continue
                std = 0.02 / (2 * cfg.depth) ** 0.5 if name.endswith("c_proj.weight") else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


class NextTokenObjective(Objective):
    """Mean next-token cross-entropy over real tokens (``batch.mask``) that are not condition positions."""

    def __init__(self, model: GPT2LMHeadModel) -> None:
        self.model = model

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Return the loss of ``batch``; deterministic unless the config has dropout (drawn by torch itself)."""
        logits = self.model(input_ids=batch.ids, attention_mask=batch.mask.long()).logits  # (B, L, V)
        target = batch.ids[:, 1:]  # (B, L - 1)
        counted = (batch.mask[:, 1:] & ~batch.cond_mask[:, 1:]).float()  # (B, L - 1)
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(), reduction="none")
        loss = (nll * counted.flatten()).sum() / counted.sum().clamp_min(1)
        return LossOutput(loss=loss, metrics={"ppl": float(loss.detach().exp())})


class AutoregressivePipeline(Pipeline):
    """Left-to-right sampling with a KV cache: ``max_new_tokens`` per sample, stopping rows at EOS.

    Each sample starts from EOS followed by its prompt (none: unconditional). Token selection is the shared
    :func:`~cdlm.sampling.tokens.select_tokens` (temperature, top-k, top-p, repetition penalty).
    """

    def __init__(self, cfg: ArConfig, model: GPT2LMHeadModel) -> None:
        self.cfg, self.model = cfg, model

    @torch.no_grad()
    def __call__(
        self, request: GenerateRequest, generator: torch.Generator, on_step: StepCallback | None = None
    ) -> GenerateOutput:
        """Generate ``request.num_samples`` continuations in batches of ``settings.batch_size``.

        ``on_step`` is not called: there is no flow state to observe; ``nfe`` counts the network calls.
        """
        settings: ArSampleConfig = request.settings
        prompts = request.prompts or [[] for _ in range(request.num_samples)]
        if len(prompts) != request.num_samples:
            raise DataError(f"AR generation: got {len(prompts)} prompts for num_samples={request.num_samples}")
        ids: list[list[int]] = []
        ends: list[int] = []
        nfe = 0
        for start in range(0, request.num_samples, settings.batch_size):
            rows, steps = self._batch(prompts[start : start + settings.batch_size], settings, generator)
            for row in rows:
                ends.append(row.index(self.cfg.eos_id) if self.cfg.eos_id in row else len(row))
            ids.extend(rows)
            nfe += steps
        return GenerateOutput(ids=ids, nfe=nfe, text_ends=ends)

    def _batch(
        self,
        prompts: list[list[int]],
        settings: ArSampleConfig,
        generator: torch.Generator,
    ) -> tuple[list[list[int]], int]:
        """Sample one batch; prompts are left-padded so that every row's next token sits at the last position."""
        device = next(self.model.parameters()).device
        contexts = [[self.cfg.eos_id, *p] for p in prompts]
        width = max(len(c) for c in contexts)
        new = min(settings.max_new_tokens, self.cfg.max_length - width)
        if new <= 0:
            raise DataError(
                f"AR generation: a prompt of {width - 1} tokens leaves no room in model.max_length="
                f"{self.cfg.max_length}; shorten the prompt"
            )
        ids = torch.tensor([[self.cfg.pad_id] * (width - len(c)) + c for c in contexts], device=device)  # (B, P)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)  # (B, P)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, P)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        # the repetition penalty's history: prompt and generated tokens; the leading EOS and the left padding are
        # the pad id in every row, so a row's draw does not depend on how long the other prompts are
        history = ids.masked_fill(positions == 0, self.cfg.pad_id)  # (B, P)
        done = torch.zeros(len(contexts), dtype=torch.bool, device=device)  # (B,)
        generated: list[Tensor] = []
        for step in range(new):
            token = select_tokens(
                out.logits[:, -1:].float(),
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                repetition_penalty=settings.repetition_penalty,
                previous_ids=history,
                generator=generator,
            )[:, 0]  # (B,)
            token = torch.where(done, torch.full_like(token, self.cfg.eos_id), token)
            generated.append(token)
            history = torch.cat([history, token[:, None]], dim=1)  # (B, P + step + 1)
            done |= token == self.cfg.eos_id
            if bool(done.all()) or step == new - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        rows = torch.stack(generated, dim=1).tolist()  # (B, new)
        return rows, len(generated)
