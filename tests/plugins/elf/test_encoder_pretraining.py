"""ELF's optional first stage: the encoder pretrained by masked LM on the run's corpus, then frozen for the flow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cdlm
from cdlm.errors import RecipeError
from cdlm.interfaces import TokenBatch
from cdlm.recipes import stage_config
from cdlm_elf.encoder_pretraining import MaskedLMObjective
from tiny import SMALL_BPE

ENCODER = (
    "{pretrained: null, vocab_size: 513, d_model: 32, num_layers: 1, num_heads: 2, d_kv: 16, d_ff: 64, "
    "mlm_mask_prob: 0.15}"
)
TINY = [
    f"model.encoder={ENCODER}",
    *SMALL_BPE,
    "model.latent_dim=32",
    "model.hidden_size=32",
    "model.depth=1",
    "model.num_heads=2",
    "model.bottleneck_dim=16",
    "model.max_length=32",
    "data.seq_len=32",
    "data.max_rows=300",
    "train.batch_size=8",
    "train.log_every=5",
]
STAGES = (
    "stages=[{name: encoder, overrides: {model: {stage: encoder}, train: {steps: 30, optimizer: adamw, lr: 3.0e-3}}},"
    " {name: flow, overrides: {train: {steps: 3}}}]"
)


def test_masked_lm_masks_only_loss_tokens_at_the_rate() -> None:
    method = cdlm.build(cdlm.load_recipe("elf-tiny", [*TINY, "model.stage=encoder"]))
    objective = method.objective
    assert isinstance(objective, MaskedLMObjective)
    seen: list[torch.Tensor] = []
    original = objective.embedder.hidden_states

    def recording(ids: torch.Tensor, mask3d: torch.Tensor) -> torch.Tensor:
        seen.append(ids)
        return original(ids, mask3d)

    objective.embedder.hidden_states = recording  # type: ignore[method-assign]
    ids = torch.randint(2, 512, (64, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 24:] = False  # padding is never masked
    cond = torch.zeros_like(mask)
    cond[:, :4] = True  # nor is the condition
    objective(TokenBatch(ids, mask, cond), torch.Generator().manual_seed(1))
    masked = seen[0] == 512
    assert not masked[:, 24:].any() and not masked[:, :4].any()
    assert 0.12 < masked[:, 4:24].float().mean().item() < 0.18


def test_masked_lm_loss_is_the_mean_cross_entropy_of_the_masked_tokens() -> None:
    method = cdlm.build(cdlm.load_recipe("elf-tiny", [*TINY, "model.stage=encoder"]))
    objective = method.objective
    assert isinstance(objective, MaskedLMObjective)
    ids = torch.randint(2, 512, (16, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = objective(TokenBatch(ids, mask, torch.zeros_like(mask)), torch.Generator().manual_seed(1))
    # the same draw, then the head on every row and the loss masked afterwards
    masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < objective.mask_prob
    embedder = objective.embedder
    with torch.no_grad():
        hidden = embedder.hidden_states(ids.masked_fill(masked, objective.mask_id), torch.ones(16, 32, 32).bool())
        ce = torch.nn.functional.cross_entropy(embedder.mlm_head(hidden).flatten(0, 1), ids.flatten(), reduction="none")
    expected = (ce * masked.flatten()).sum() / masked.sum()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-6, atol=0)


def test_the_flow_stage_freezes_the_encoder_the_first_stage_trained(tmp_path: Path) -> None:
    config = cdlm.load_recipe("elf-tiny", [*TINY, STAGES])
    cdlm.train(config, tmp_path / "run")
    records = [line for line in (tmp_path / "run" / "encoder" / "metrics.jsonl").read_text().splitlines() if line]
    first, last = (json.loads(r) for r in (records[0], records[-1]))
    assert last["loss"] < first["loss"]  # the masked LM learns
    encoder_end = load_file(next((tmp_path / "run" / "encoder" / "checkpoints").glob("*/model.safetensors")))
    flow_end = load_file(next((tmp_path / "run" / "flow" / "checkpoints").glob("*/model.safetensors")))
    keys = [k for k in encoder_end if k.startswith("embedder.")]
    assert keys and all(torch.equal(encoder_end[k], flow_end[k]) for k in keys)  # loaded, then frozen
    assert any(not torch.equal(encoder_end[k], flow_end[k]) for k in flow_end if k.startswith("network."))
    flow = cdlm.build(stage_config(config, "flow"))
    assert all(not p.requires_grad for p in flow.embedder.parameters())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.stage=encoder", "model.encoder.mlm_mask_prob=null"], "model.stage: encoder needs model.encoder.mlm"),
        (
            [f"model.encoder={ENCODER.replace('513', '512')}", "model.vocab_size=512"],
            "model.encoder.vocab_size: 512: a masked-LM encoder needs one id past the model.vocab_size 512",
        ),
    ],
)
def test_bad_encoder_stage_settings_are_refused(overrides: list[str], expected: str) -> None:
    with pytest.raises(RecipeError, match=expected):
        cdlm.load_recipe("elf-tiny", overrides)
