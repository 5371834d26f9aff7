"""The official release layout (hf_models/cola_dlm/…, hf_models/tokenizer.json): detect, read, write, round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models
from torch import Tensor

from cdlm.config import RunConfig
from cdlm.data.tokenize import load_tokenizer
from cdlm.errors import CheckpointError, RecipeError
from cdlm.interfaces import GenerateRequest, Method, ReleasedCheckpoint
from cdlm.recipes import set_dotted, validate
from cdlm.shards import DEFAULT_SHARD_BYTES
from cdlm_cola import build, spec
from cdlm_cola.config import read_dit_config, read_vae_config
from cdlm_cola.released import ColaOfficialRelease
from cdlm_cola.state_dict import load_pretrained_dit, load_pretrained_vae
from conftest import shared_path
from parity import assert_same_weights

RELEASE = ColaOfficialRelease()


def fixture(name: str) -> Path:
    return shared_path("fixtures", "cola", name)


def release(tmp_path: Path, dit: str = "cola_dit") -> Path:
    """Lay the fixtures out as the release's hf_models/ tree (spec §1.1)."""
    hf = tmp_path / "hf_models"
    for src, dst in ((dit, "cola_dit"), ("cola_vae", "cola_vae")):
        shutil.copytree(fixture(src), hf / "cola_dlm" / dst, copy_function=shutil.copyfile)
    shutil.copyfile(fixture("tokenizer.json"), hf / "tokenizer.json")
    return hf


def loaded(ckpt: ReleasedCheckpoint) -> Method:
    """Build the recipe and load the weights as the core does: only the frozen ref_vae.* may be missing."""
    method = build(validate(ckpt.recipe))
    missing, unexpected = method.modules().load_state_dict(ckpt.weights, strict=False)
    assert unexpected == [] and missing and all(k.startswith("ref_vae.") for k in missing)
    return method


def assert_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def written(
    method: Method,
    cfg: RunConfig,
    directory: Path,
    *,
    ema: dict[str, Tensor] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    tokenizer = load_tokenizer(cfg.data, directory, texts=())
    weights = method.modules().state_dict()
    return RELEASE.write(
        directory, config=cfg, weights=weights, ema=ema, step=7, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes
    )


def test_registered_and_detects_the_release_tree(tmp_path: Path) -> None:
    assert [type(f) for f in spec.released_formats] == [ColaOfficialRelease] and RELEASE.name == "cola-official"
    hf = release(tmp_path)
    assert RELEASE.detect(hf) and RELEASE.detect(hf / "cola_dlm")
    for other in (tmp_path, hf / "cola_dlm" / "cola_dit", hf / "tokenizer.json", tmp_path / "absent"):
        assert not RELEASE.detect(other)
    (hf / "cola_dlm" / "cola_vae" / "config.json").unlink()
    assert not RELEASE.detect(hf)


@pytest.mark.parametrize("dit", ["cola_dit", "cola_dit_sharded"])
@pytest.mark.parametrize("at", [".", "cola_dlm"])
def test_read_builds_the_release_and_loads_its_weights(tmp_path: Path, dit: str, at: str) -> None:
    hf = release(tmp_path, dit)
    ckpt = RELEASE.read(hf / at)
    assert ckpt.ema is None and ckpt.step is None
    cfg = validate(ckpt.recipe)
    assert cfg.model.dit == read_dit_config(fixture(dit)) and cfg.model.vae == read_vae_config(fixture("cola_vae"))
    assert (cfg.model.pad_id, cfg.model.eos_id, cfg.model.im_end_id) == (3, 0, 2)  # the fixture tokenizer's
    assert (cfg.model.pretrained_dit, cfg.model.pretrained_vae) == (None, None)
    assert cfg.data.tokenizer == str(hf / "tokenizer.json") and cfg.model.per_sample_noise_seed == 66  # cola-2b's
    method = loaded(ckpt)
    # both DiT layouts give the single-file fixture's tensors
    assert_equal(method.modules()["dit"].state_dict(), load_pretrained_dit(fixture("cola_dit")).state_dict())
    assert_equal(method.modules()["vae"].state_dict(), load_pretrained_vae(fixture("cola_vae")).state_dict())


def test_read_release_samples_like_the_reference(tmp_path: Path) -> None:
    """cola-2b's sampling settings are the benchmark's (spec §11.3): the greedy fixture run, via `--set`."""
    ckpt = RELEASE.read(release(tmp_path))
    set_dotted(ckpt.recipe, "sample.max_new_tokens=16")
    cfg = validate(ckpt.recipe)
    method = loaded(ckpt)
    method.modules().eval()
    tok = load_tokenizer(cfg.data, tmp_path, texts=())
    meta = json.loads(fixture("generate_fp32.json").read_text())
    prompts = [tok.encode(p["question"], add_special_tokens=False) for p in meta["meta/prompts"]]
    out = method.pipeline(GenerateRequest(3, prompts, cfg.sample), torch.Generator().manual_seed(cfg.sample.seed))
    expected = [r["generate"] for r in meta["gen/greedy_cfg7_perSampleSeed66/results"]]
    assert tok.batch_decode(out.ids, skip_special_tokens=False) == expected


def test_write_then_read_round_trips_exactly(tmp_path: Path) -> None:
    ckpt = RELEASE.read(release(tmp_path / "in"))
    cfg = validate(ckpt.recipe)
    out = written(loaded(ckpt), cfg, tmp_path / "out")
    assert out == tmp_path / "out"
    again = RELEASE.read(out)
    assert_equal(again.weights, ckpt.weights)
    for recipe in (again.recipe, ckpt.recipe):
        recipe.pop("description"), recipe["data"].pop("tokenizer")
    assert again.recipe == ckpt.recipe
    # the official-layout readers take the written tree, and it has the reference's keys (rope.freqs included)
    for name, load in (("cola_dit", load_pretrained_dit), ("cola_vae", load_pretrained_vae)):
        directory = out / "cola_dlm" / name
        assert_equal(load(directory).state_dict(), load(fixture(name)).state_dict())
        assert_same_weights(load_file(directory / "model.safetensors"), load_file(fixture(name) / "model.safetensors"))
    text = "The quick brown fox"
    reference = Tokenizer.from_file(str(fixture("tokenizer.json")))
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(text).ids == reference.encode(text).ids


def test_write_ships_the_ema_weights_where_there_are_some(tmp_path: Path) -> None:
    ckpt = RELEASE.read(release(tmp_path / "in"))
    method, cfg = loaded(ckpt), validate(ckpt.recipe)
    ema = {k: v + 1 for k, v in ckpt.weights.items() if k.startswith("dit.")}
    again = RELEASE.read(written(method, cfg, tmp_path / "out", ema=ema)).weights
    assert_equal({k: v for k, v in again.items() if k.startswith("dit.")}, ema)
    assert_equal({k: v for k, v in again.items() if k.startswith("vae.")},
                 {k: v for k, v in ckpt.weights.items() if k.startswith("vae.")})  # fmt: skip


def test_small_shard_limit_writes_a_sharded_dit_that_reads_back(tmp_path: Path) -> None:
    ckpt = RELEASE.read(release(tmp_path / "in"))
    method, cfg = loaded(ckpt), validate(ckpt.recipe)
    written(method, cfg, tmp_path / "out")  # first a single file, then shards over it: no stale file stays
    out = written(method, cfg, tmp_path / "out", max_shard_bytes=400_000)
    dit_dir = out / "cola_dlm" / "cola_dit"
    assert sorted(p.name for p in dit_dir.glob("model*")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert_equal(RELEASE.read(out).weights, ckpt.weights)


def test_tokenizer_next_to_the_two_folders_is_found(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot"  # a hub repo holding the two folders and the tokenizer side by side
    shutil.copytree(release(tmp_path) / "cola_dlm", snapshot)
    shutil.copyfile(fixture("tokenizer.json"), snapshot / "tokenizer.json")
    assert validate(RELEASE.read(snapshot).recipe).data.tokenizer == str(snapshot / "tokenizer.json")


def test_missing_tokenizer_lists_where_it_looked(tmp_path: Path) -> None:
    hf = release(tmp_path)
    (hf / "tokenizer.json").unlink()
    for at in (hf, hf / "cola_dlm"):
        with pytest.raises(CheckpointError) as err:
            RELEASE.read(at)
        assert str(hf / "tokenizer.json") in str(err.value)
        assert str(hf / "cola_dlm" / "tokenizer.json") in str(err.value)


def test_broken_or_absent_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a Cola release"):
        RELEASE.read(tmp_path)
    hf = release(tmp_path)
    vae_config = hf / "cola_dlm" / "cola_vae" / "config.json"
    vae_config.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{vae_config}: not valid JSON"):
        RELEASE.read(hf)
    shutil.copyfile(fixture("cola_vae") / "config.json", vae_config)
    dit_config = hf / "cola_dlm" / "cola_dit" / "config.json"
    dit_config.write_text(json.dumps({**json.loads(dit_config.read_text()), "heads": "many"}))
    with pytest.raises(CheckpointError, match=rf"{dit_config}: heads"):
        RELEASE.read(hf)


def test_ids_of_tokens_the_tokenizer_lacks(tmp_path: Path) -> None:
    """cola-2b's OLMo ids outside the VAE vocabulary: im_end_id off; pad/eos kept for the build to name."""
    hf = release(tmp_path)
    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(hf / "tokenizer.json"))
    ckpt = RELEASE.read(hf)
    assert [ckpt.recipe["model"][k] for k in ("pad_id", "eos_id", "im_end_id")] == [100277, 100257, None]
    with pytest.raises(RecipeError, match=r"model\.pad_id=100277 is outside the VAE vocabulary"):
        build(validate(ckpt.recipe))
    for item in ("model.pad_id=1", "model.eos_id=0"):  # what `--set` does
        set_dotted(ckpt.recipe, item)
    loaded(ckpt)
