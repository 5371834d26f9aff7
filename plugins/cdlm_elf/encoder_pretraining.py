"""Pretraining ELF's encoder by masked LM, for corpora and machines with no pretrained T5 at hand (not in the paper).

ELF's premise is a *pretrained* frozen encoder; the paper's random-encoder ablation is much worse. Offline, the
closest equivalent is an encoder that cdlm pretrains on the run's own corpus in a first recipe stage
(``model.stage: encoder``), then freezes for flow matching (``stage: flow``, initialised from the first stage).
The objective is BERT's masked LM rather than T5's span corruption: it trains the encoder alone (no decoder to
build and discard), and its outputs must keep each token recoverable, which ELF's decoder needs too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdlm.interfaces import LossOutput, Objective, TokenBatch
from cdlm_elf.config import ElfConfig
from cdlm_elf.embedder import T5Embedder, encoder_mask


class MaskedLMObjective(Objective):
    """Replace ``encoder.mlm_mask_prob`` of the loss tokens by [MASK] (the last encoder id) and predict them.

    Args:
        cfg: the ELF config (``encoder.mlm_mask_prob``, ``encoder.vocab_size``).
        embedder: the T5 embedder with its ``mlm_head``; its encoder and head are trained.
    """

    def __init__(self, cfg: ElfConfig, embedder: T5Embedder) -> None:
        assert cfg.encoder.mlm_mask_prob is not None and embedder.mlm_head is not None
        self.embedder, self.mask_prob, self.mask_id = embedder, cfg.encoder.mlm_mask_prob, cfg.encoder.vocab_size - 1

    def __call__(self, batch: TokenBatch, generator: torch.Generator) -> LossOutput:
        """Return the mean cross-entropy over the masked tokens, and the share of them predicted right.

        The head runs on the masked rows only (``mlm_mask_prob`` of them): with a BPE of a few thousand tokens the
        (B, L, V) logits of every row would cost more than the encoder itself.
        """
        assert self.embedder.mlm_head is not None
        draw = torch.rand(batch.ids.shape, generator=generator, device=generator.device).to(batch.ids.device)
        masked = (draw < self.mask_prob) & batch.mask & ~batch.cond_mask  # (B, L)
        inputs = batch.ids.masked_fill(masked, self.mask_id)  # (B, L)
        hidden = self.embedder.hidden_states(inputs, encoder_mask(batch.mask, batch.cond_mask))  # (B, L, C)
        logits = self.embedder.mlm_head(hidden[masked]).float()  # (M, V), M masked tokens
        targets = batch.ids[masked]  # (M,)
        count = max(int(targets.numel()), 1)
        loss = F.cross_entropy(logits, targets, reduction="sum") / count
        accuracy = (logits.argmax(-1) == targets).float().sum() / count
        return LossOutput(loss=loss, metrics={"mlm_accuracy": float(accuracy)})


def trainable_encoder(embedder: T5Embedder) -> T5Embedder:
    """Make the embedder's encoder and head trainable (``stage: encoder``); returns it."""
    embedder.t5.requires_grad_(True)
    assert embedder.mlm_head is not None
    embedder.mlm_head.requires_grad_(True)
    return embedder
