"""The Cola MethodSpec: registration, build (random, pretrained, meta), stage modules, and sampling end to end."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import cdlm
from cdlm.config import DataConfig, RunConfig
from cdlm.data.tokenize import load_tokenizer
from cdlm.errors import RecipeError
from cdlm.interfaces import GenerateRequest, TokenBatch
from cdlm.recipes import validate
from cdlm.registry import get_method
from cdlm_cola import spec
from cdlm_cola.components import ReferenceVAE
from cdlm_cola.config import ColaConfig
from cdlm_cola.state_dict import load_pretrained_dit, load_pretrained_vae
from conftest import shared_path

TINY_DIT = {"txt_in_channels": 8, "txt_out_channels": 8, "txt_dim": 32, "emb_dim": 32, "heads": 2, "head_dim": 16,
            "rope_dim": 8, "num_layers": 1, "block_size": 4}  # fmt: skip
TINY_VAE = {"vocab_size": 64, "dim": 32, "ffn_dim": 64, "encoder_num_blocks": 1, "decoder_num_blocks": 1,
            "num_heads": 2, "latent_dim": 8, "block_size": 4}  # fmt: skip
FIXTURE_IDS = {"pad_id": 3, "eos_id": 0, "im_end_id": 2}


def config(model: dict[str, Any], **sections: Any) -> RunConfig:
    sections.setdefault("data", {"vocab_size": TINY_VAE["vocab_size"]})  # a trained BPE fits the tiny VAE
    return validate({"method": "cola", "model": {**FIXTURE_IDS, **model}, **sections})


def fixture_dirs() -> dict[str, str]:
    return {
        "pretrained_vae": str(shared_path("fixtures", "cola", "cola_vae")),
        "pretrained_dit": str(shared_path("fixtures", "cola", "cola_dit_sharded")),
    }


def test_the_plugin_is_registered() -> None:
    assert get_method("cola") is spec
    assert spec.name == "cola" and spec.config_cls is ColaConfig


def test_release_recipe_has_the_paper_parameter_counts() -> None:
    cfg = cdlm.load_recipe("cola-2b")
    with torch.device("meta"):
        method = cdlm.build(cfg)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in method.modules().items()}
    assert counts == {"vae": 501_871_574, "dit": 1_829_875_728, "ref_vae": 501_871_574}  # spec §1.3
    assert set(method.trainable) == {"vae", "dit"} and set(method.frozen) == {"ref_vae"}  # stage: joint
    assert len(method.modules()["dit"].state_dict()) == 446 and len(method.modules()["vae"].state_dict()) == 133
    s = cfg.sample
    assert (s.steps, s.sampler, s.grid, s.guidance, s.temperature, s.max_new_tokens) == (
        16,
        "euler",
        "uniform",
        7.0,
        0.0,
        32,
    )
    assert (s.top_k, s.top_p, s.repetition_penalty) == (50, 0.9, 1.1)
    assert (cfg.model.pad_id, cfg.model.eos_id, cfg.model.im_end_id, method.vocab_size) == (
        100277,
        100257,
        100265,
        100278,
    )


@pytest.mark.parametrize(
    ("stage", "trainable", "frozen"),
    [
        ("vae", {"vae"}, {"dit", "ref_vae"}),
        ("joint", {"vae", "dit"}, {"ref_vae"}),
        ("dit", {"dit"}, {"vae", "ref_vae"}),
    ],
)
def test_stages_share_module_keys_and_chain_strictly(stage: str, trainable: set[str], frozen: set[str]) -> None:
    method = cdlm.build(config({"vae": TINY_VAE, "dit": TINY_DIT, "stage": stage}))
    assert (set(method.trainable), set(method.frozen)) == (trainable, frozen)
    stage_one = cdlm.build(config({"vae": TINY_VAE, "dit": TINY_DIT, "stage": "vae"}, seed=1))
    method.modules().load_state_dict(stage_one.modules().state_dict(), strict=True)  # train.init_from's load
    assert torch.equal(method.modules()["vae"].encoder.wte.weight, stage_one.modules()["vae"].encoder.wte.weight)


def test_joint_stage_anchors_to_the_stage_one_vae() -> None:
    stage_one = cdlm.build(config({"vae": TINY_VAE, "dit": TINY_DIT, "stage": "vae"}, seed=1))
    with torch.no_grad():
        stage_one.modules()["vae"].encoder.wte.weight.add_(1.0)  # Stage 1 trains the VAE, never its reference
    joint = cdlm.build(config({"vae": TINY_VAE, "dit": TINY_DIT, "stage": "joint"}))
    joint.modules().load_state_dict(stage_one.modules().state_dict(), strict=True)  # train.init_from
    ref = joint.modules()["ref_vae"]
    assert isinstance(ref, ReferenceVAE) and not ref.synced
    assert not torch.equal(ref.encoder.wte.weight, stage_one.modules()["vae"].encoder.wte.weight)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    batch = TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool))
    joint.objective(batch, torch.Generator().manual_seed(0))  # the first joint step anchors the reference
    assert ref.synced and torch.equal(ref.encoder.wte.weight, stage_one.modules()["vae"].encoder.wte.weight)


def test_random_init_is_seeded() -> None:
    a, b = (cdlm.build(config({"vae": TINY_VAE, "dit": TINY_DIT})) for _ in range(2))
    c = cdlm.build(config({"vae": TINY_VAE, "dit": TINY_DIT}, seed=1))
    sd_a, sd_b, sd_c = (m.modules().state_dict() for m in (a, b, c))
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not torch.equal(sd_a["dit.txt_in.proj.weight"], sd_c["dit.txt_in.proj.weight"])


def test_pretrained_directories_load_and_config_json_wins(caplog: pytest.LogCaptureFixture) -> None:
    dirs = fixture_dirs()
    vae_cfg = json.loads(shared_path("fixtures", "cola", "cola_vae", "config.json").read_text())
    shapes = ("vocab_size", "dim", "ffn_dim", "latent_dim", "num_heads", "encoder_num_blocks", "decoder_num_blocks")
    inline_vae = {k: vae_cfg[k] for k in shapes}
    method = cdlm.build(config({**dirs, "vae": {**inline_vae, "block_size": 16}}))  # block_size: shape-neutral
    assert "model.vae.block_size: 16 vs 4" in caplog.text
    vae, dit = method.modules()["vae"], method.modules()["dit"]
    assert vae.config.block_size == 4 and vae.config.scaling_factor == 1.3 and method.vocab_size == 320
    expected_vae, expected_dit = (
        load_pretrained_vae(dirs["pretrained_vae"]),
        load_pretrained_dit(dirs["pretrained_dit"]),
    )
    assert all(torch.equal(v, expected_vae.state_dict()[k]) for k, v in vae.state_dict().items())
    assert all(torch.equal(v, expected_dit.state_dict()[k]) for k, v in dit.state_dict().items())
    with pytest.raises(RecipeError, match=r"other parameter shapes .*model\.vae\.dim: 48 vs 64"):
        cdlm.build(config({**dirs, "vae": {**inline_vae, "dim": 48}}))


def test_meta_build_reads_nothing_when_shapes_are_inline(tmp_path: Any) -> None:
    missing = {"pretrained_vae": str(tmp_path / "none"), "pretrained_dit": str(tmp_path / "none")}
    with torch.device("meta"):
        method = cdlm.build(config({"vae": TINY_VAE, "dit": TINY_DIT, **missing}))
    assert all(p.device.type == "meta" for p in method.modules().parameters())


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"dit": TINY_DIT}, r"model\.vae: give the network's shapes"),
        ({"vae": {**TINY_VAE, "latent_dim": 4}, "dit": TINY_DIT}, "must equal model.vae.latent_dim"),
        ({"vae": TINY_VAE, "dit": TINY_DIT, "pad_id": 64}, r"model\.pad_id=64 is outside the VAE vocabulary"),
    ],
)
def test_build_errors_name_the_field(model: dict[str, Any], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        cdlm.build(config(model))


def test_official_weights_sample_without_training(tmp_path: Any) -> None:
    """The `cdlm sample --recipe … --set model.pretrained_*=DIR --set data.tokenizer=…/tokenizer.json` path."""
    tokenizer_file = str(shared_path("fixtures", "cola", "tokenizer.json"))
    meta = json.loads(shared_path("fixtures", "cola", "generate_fp32.json").read_text())
    sample = {"sampler": "euler", "grid": "uniform", "steps": 16, "guidance": 7.0, "max_new_tokens": 16,
              "repetition_penalty": 1.1}  # fmt: skip
    cfg = config({**fixture_dirs(), "per_sample_noise_seed": 66}, data={"tokenizer": tokenizer_file}, sample=sample)
    method = cdlm.build(cfg)
    tok = load_tokenizer(DataConfig(tokenizer=tokenizer_file), tmp_path, texts=())
    prompts = [tok.encode(p["question"], add_special_tokens=False) for p in meta["meta/prompts"]]
    out = method.pipeline(GenerateRequest(3, prompts, cfg.sample), torch.Generator().manual_seed(cfg.sample.seed))
    expected = [r["generate"] for r in meta["gen/greedy_cfg7_perSampleSeed66/results"]]
    assert tok.batch_decode(out.ids, skip_special_tokens=False) == expected
