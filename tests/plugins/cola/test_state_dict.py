"""Official checkpoint directories: config.json, single and sharded safetensors, strict loading, round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cdlm.errors import CheckpointError
from cdlm_cola.config import ColaDitConfig, read_dit_config, read_vae_config
from cdlm_cola.state_dict import (
    load_pretrained_dit,
    load_pretrained_vae,
    save_pretrained_dit,
    save_pretrained_vae,
)
from conftest import shared_path
from parity import assert_same_weights


def fixture_dir(name: str) -> Path:
    return shared_path("fixtures", "cola", name)


def copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fixture_dir(name), tmp_path / name, copy_function=shutil.copyfile))


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_loads_every_tensor_of_the_official_files() -> None:
    dit = load_pretrained_dit(fixture_dir("cola_dit"))
    official = load_file(fixture_dir("cola_dit") / "model.safetensors")
    ours = dit.state_dict()
    assert set(official) - set(ours) == {"blocks.0.msa.rope.rope.freqs", "blocks.1.msa.rope.rope.freqs"}
    assert all(torch.equal(ours[k], official[k]) for k in ours)
    vae = load_pretrained_vae(fixture_dir("cola_vae"))
    official = load_file(fixture_dir("cola_vae") / "model.safetensors")
    assert vae.state_dict().keys() == official.keys()
    assert all(torch.equal(v, official[k]) for k, v in vae.state_dict().items())
    assert (vae.config.scaling_factor, vae.config.shifting_factor, dit.config.block_size) == (1.3, 0.05, 4)


def test_sharded_dit_loads_identical_tensors() -> None:
    single = load_pretrained_dit(fixture_dir("cola_dit")).state_dict()
    sharded = load_pretrained_dit(fixture_dir("cola_dit_sharded")).state_dict()
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)


def test_save_then_load_round_trips_bit_exactly(tmp_path: Path) -> None:
    dit = load_pretrained_dit(fixture_dir("cola_dit"))
    vae = load_pretrained_vae(fixture_dir("cola_vae"))
    save_pretrained_dit(dit, tmp_path / "dit")
    save_pretrained_vae(vae, tmp_path / "vae")
    for ours, name in ((tmp_path / "dit", "cola_dit"), (tmp_path / "vae", "cola_vae")):
        written, official = load_file(ours / "model.safetensors"), load_file(fixture_dir(name) / "model.safetensors")
        assert_same_weights(written, official)  # rope.freqs included: the reference loads ours strictly
        raw = json.loads((ours / "config.json").read_text())
        assert raw["architectures"] == json.loads((fixture_dir(name) / "config.json").read_text())["architectures"]
    assert read_dit_config(tmp_path / "dit") == dit.config and read_vae_config(tmp_path / "vae") == vae.config
    reloaded = load_pretrained_dit(tmp_path / "dit").state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in dit.state_dict().items())


def test_rope_freqs_buffers_are_optional_but_checked(tmp_path: Path) -> None:
    directory = copy("cola_dit", tmp_path)
    sd = load_file(directory / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "rope" not in k}, directory / "model.safetensors")
    load_pretrained_dit(directory)
    save_file(
        {**sd, "blocks.1.msa.rope.rope.freqs": sd["blocks.1.msa.rope.rope.freqs"] * 2}, directory / "model.safetensors"
    )
    with pytest.raises(CheckpointError, match=r"blocks\.1\.msa\.rope\.rope\.freqs: expected 1/10000"):
        load_pretrained_dit(directory)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    directory = copy("cola_dit_sharded", tmp_path)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard file.*missing.*model-00002-of-00002.safetensors"):
        load_pretrained_dit(directory)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    directory = copy("cola_vae", tmp_path)
    sd = load_file(directory / "model.safetensors")
    del sd["decoder.final_layer.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    save_file(sd, directory / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_pretrained_vae(directory)
    assert "1 missing keys (decoder.final_layer.bias)" in str(err.value)
    assert "1 unexpected keys (decoder.extra.weight)" in str(err.value)


def test_config_that_does_not_fit_the_weights_names_the_shapes(tmp_path: Path) -> None:
    directory = copy("cola_dit", tmp_path)
    edit_config(directory, expand_ratio=2)
    with pytest.raises(CheckpointError) as err:
        load_pretrained_dit(directory)
    assert "6 mis-shaped keys (blocks.0.mlp.proj_in.weight (256, 64) (expected (128, 64))," in str(err.value)


def test_config_errors_name_file_and_field(tmp_path: Path) -> None:
    directory = copy("cola_dit", tmp_path)
    edit_config(directory, heads="four", rope_dimm=12)
    with pytest.raises(CheckpointError) as err:
        read_dit_config(directory)
    assert f"{directory / 'config.json'}: heads: input should be a valid integer" in str(err.value)
    assert "rope_dimm: unknown field" in str(err.value)
    with pytest.raises(CheckpointError, match="model_type: expected 'cola_text_vae', got 'cola_dit'"):
        read_vae_config(directory)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_pretrained_dit(directory)
    other = copy("cola_dit", tmp_path / "other")
    edit_config(other, emb_dim=32)
    with pytest.raises(CheckpointError, match="config.json: emb_dim must equal txt_dim"):
        read_dit_config(other)


def test_hf_bookkeeping_and_sft_keys_are_accepted() -> None:
    raw = {
        "architectures": ["ColaDiTModel"],
        "model_type": "cola_dit",
        "transformers_version": "4.57.0",
        "torch_dtype": "float32",
        "dtype": "float32",
        "sft_chat_format": "chatml",
        "sft_pad_with_stop": True,
        "sft_stop_token_id": 100265,
        "block_size": 16,
    }
    config = ColaDitConfig.model_validate(raw)
    assert (config.block_size, config.sft_chat_format, config.txt_dim) == (16, "chatml", 2048)
    assert "sft_chat_format" not in ColaDitConfig().to_hf_dict()
