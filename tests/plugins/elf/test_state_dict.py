"""ELF state-dict adapter: bit-exact round trip, key coverage, and errors that name the offending keys."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from cdlm.errors import CheckpointError
from cdlm_elf.config import ElfConfig
from cdlm_elf.model import ElfTransformer
from cdlm_elf.state_dict import ElfStateDictAdapter
from conftest import shared_path

DEPTH2 = ElfConfig(depth=2)


def our_keys(cfg: ElfConfig) -> set[str]:
    """Keys of the Method's trainable modules ({"network": ElfTransformer}), built on meta."""
    with torch.device("meta"):
        return set(nn.ModuleDict({"network": ElfTransformer(cfg)}).state_dict())


@pytest.fixture(scope="module")
def official() -> dict[str, Tensor]:
    return load_file(shared_path("fixtures", "elf", "model.safetensors"))


def assert_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def test_round_trip_is_bit_exact(official: dict[str, Tensor]) -> None:
    adapter = ElfStateDictAdapter(DEPTH2)
    ours = adapter.from_official(official)
    assert set(ours) == our_keys(DEPTH2)
    assert ours["network.decoder_head.proj.weight"].shape == official["proj_kernel"].shape[::-1]
    assert_identical(adapter.to_official(ours), official)
    assert_identical(adapter.from_official(adapter.to_official(ours)), ours)


@pytest.mark.parametrize("weights", ["params", "ema_params1"])
def test_reference_checkpoint_has_no_missing_or_unknown_keys(weights: str) -> None:
    ckpt = torch.load(shared_path("fixtures", "elf", "ckpt", "checkpoint_1"), map_location="cpu", weights_only=True)
    assert set(ElfStateDictAdapter(DEPTH2).from_official(ckpt[weights])) == our_keys(DEPTH2)


@pytest.mark.parametrize("depth", [2, 12])
def test_official_layout_has_23_plus_12_per_block_keys(depth: int) -> None:
    cfg = ElfConfig(depth=depth)
    with torch.device("meta"):
        ours = nn.ModuleDict({"network": ElfTransformer(cfg)}).state_dict()
    official = ElfStateDictAdapter(cfg).to_official(ours)
    assert len(official) == 23 + 12 * depth
    assert official["proj_kernel"].shape == (768, 512) and official["unembed_kernel"].shape == (512, 32100)


def test_missing_and_unknown_keys_are_named(official: dict[str, Tensor]) -> None:
    adapter = ElfStateDictAdapter(DEPTH2)
    broken = {k: v for k, v in official.items() if k != "blocks.1.mlp.w3.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\) \(blocks\.1\.mlp\.w3\.bias\), 0 unknown"):
        adapter.from_official(broken)
    with pytest.raises(CheckpointError, match=r"0 missing key\(s\) \(none\), 1 unknown key\(s\) \(pos_embed\)"):
        adapter.from_official({**official, "pos_embed": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \(network\.extra\)"):
        adapter.to_official({**adapter.from_official(official), "network.extra": torch.zeros(1)})


def test_other_depth_is_rejected(official: dict[str, Tensor]) -> None:
    with pytest.raises(CheckpointError, match=r"12 missing key\(s\) \(blocks\.2\..*ElfTransformer\(depth=3\)"):
        ElfStateDictAdapter(ElfConfig(depth=3)).from_official(official)
