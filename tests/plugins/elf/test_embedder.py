"""ELF embedder: spec §2 encoder masks, T5 latent parity with the fixtures, frozen and reproducible builds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import T5EncoderModel

from cdlm.errors import CheckpointError
from cdlm.interfaces import TokenBatch
from cdlm_elf.config import ElfConfig, EncoderConfig
from cdlm_elf.embedder import T5Embedder, encoder_mask
from conftest import shared_path

ATOL = 1e-5
TINY_T5 = {"vocab_size": 48, "d_model": 16, "num_layers": 2, "num_heads": 2, "d_kv": 8, "d_ff": 32}


def tiny_config(pretrained: str | None = None, seed: int = 0) -> ElfConfig:
    return ElfConfig(latent_dim=16, encoder=EncoderConfig(pretrained=pretrained, seed=seed, **TINY_T5))


@pytest.fixture(scope="module")
def encode_pack() -> dict[str, Tensor]:
    return load_file(shared_path("fixtures", "elf", "encode.safetensors"))


@pytest.fixture(scope="module")
def fixture_embedder() -> T5Embedder:
    return T5Embedder(
        ElfConfig(latent_dim=64, encoder=EncoderConfig(pretrained=str(shared_path("fixtures", "elf", "t5_encoder"))))
    )


def masks(data: dict[str, Tensor], group: str) -> tuple[Tensor, Tensor, Tensor | None]:
    source = "cond" if group == "cond_label_drop" else group  # the label-drop group reuses the cond batch
    drop = data["cond_label_drop/label_drop_mask"].bool() if group == "cond_label_drop" else None
    return data[f"{source}/attention_mask"].bool(), data[f"{source}/cond_seq_mask"].bool(), drop


@pytest.mark.parametrize("group", ["uncond", "cond", "cond_label_drop"])
def test_encoder_mask_matches_collator(encode_pack: dict[str, Tensor], group: str) -> None:
    mask, cond_mask, drop = masks(encode_pack, group)
    built = encoder_mask(mask, cond_mask, drop)
    assert built.dtype == torch.bool
    assert torch.equal(built.float(), encode_pack[f"{group}/encoder_attention_mask"])


@pytest.mark.parametrize("group", ["uncond", "cond", "cond_label_drop"])
def test_latents_match_reference(fixture_embedder: T5Embedder, encode_pack: dict[str, Tensor], group: str) -> None:
    mask, cond_mask, drop = masks(encode_pack, group)
    ids = encode_pack[f"{'cond' if drop is not None else group}/input_ids"]
    x0 = fixture_embedder.encode(ids, encoder_mask(mask, cond_mask, drop))
    assert x0.dtype == torch.float32
    torch.testing.assert_close(x0, encode_pack[f"{group}/x0"], atol=ATOL, rtol=0)
    if drop is None:  # the Embedder interface builds the same mask from the batch
        batch = TokenBatch(ids, mask, cond_mask)
        torch.testing.assert_close(fixture_embedder(batch), encode_pack[f"{group}/x0"], atol=ATOL, rtol=0)


def test_random_encoder_is_seeded_frozen_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a, b, c = T5Embedder(tiny_config(seed=3)), T5Embedder(tiny_config(seed=3)), T5Embedder(tiny_config(seed=4))
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["t5.shared.weight"], sc["t5.shared.weight"])
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert a.training and not a.t5.training


def test_pretrained_directory_loads_and_matches_transformers(tmp_path: Path) -> None:
    source = T5Embedder(tiny_config(seed=5)).t5
    source.save_pretrained(tmp_path)
    embedder = T5Embedder(tiny_config(pretrained=str(tmp_path)))
    ids = torch.randint(2, 48, (2, 10), generator=torch.Generator().manual_seed(0))
    valid = torch.arange(10) < torch.tensor([[10], [7]])  # (2, 10)
    x0 = embedder(TokenBatch(ids, valid, torch.zeros_like(valid)))
    with torch.no_grad():  # unconditional rows: the 3-D mask reduces to transformers' own 2-D key padding
        reference = T5EncoderModel.from_pretrained(tmp_path)(
            input_ids=ids, attention_mask=valid.long()
        ).last_hidden_state
    torch.testing.assert_close(x0, reference / 0.2, atol=ATOL, rtol=0)


def test_missing_pretrained_path_fails_fast_and_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-encoder")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="no-such-encoder.*save_pretrained"):
        T5Embedder(tiny_config(pretrained=missing))
    assert time.monotonic() - start < 2.0


def test_latent_dim_must_equal_d_model(tmp_path: Path) -> None:
    T5Embedder(tiny_config()).t5.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="d_model is 16, but model.latent_dim is 512"):
        T5Embedder(ElfConfig(encoder=EncoderConfig(pretrained=str(tmp_path))))
