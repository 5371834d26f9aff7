"""Loading from anywhere (hub ids, save_pretrained directories, released layouts) and writing back (convert)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cdlm
from cdlm.errors import CheckpointError
from cdlm.interfaces import GenerateOutput
from conftest import shared_path
from tiny import SMALL_BPE

# elf-tiny without its masked-LM encoder stage (tests/plugins/elf/test_encoder_pretraining.py covers it)
QUICK = [
    *["stages=[]", "train.steps=2", "train.batch_size=4", "train.save_every=2", "data.max_rows=40", "model.depth=1"],
    *SMALL_BPE,
]
SAMPLE = ["sample.num_samples=2", "sample.steps=3"]
COLA_SAMPLE = ["sample.max_new_tokens=16", "model.per_sample_noise_seed=66", "sample.batch_size=20"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained ELF run (2 steps): raw and EMA weights differ."""
    out = tmp_path_factory.mktemp("elf") / "run"
    cdlm.train(cdlm.load_recipe("elf-tiny", QUICK), out)
    return out


def cola_release(root: Path) -> Path:
    """The Cola fixtures laid out as the release's hf_models/ tree (Cola spec §1.1)."""
    hf = root / "hf_models"
    for name in ("cola_dit", "cola_vae"):
        shutil.copytree(shared_path("fixtures", "cola", name), hf / "cola_dlm" / name, copy_function=shutil.copyfile)
    shutil.copyfile(shared_path("fixtures", "cola", "tokenizer.json"), hf / "tokenizer.json")
    return hf


def hub_cache(root: Path, repo_id: str, content: Path, revision: str = "0" * 40) -> Path:
    """Put ``content`` into a Hugging Face cache under ``root`` as the ``main`` snapshot of ``repo_id``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(content, repo / "snapshots" / revision, copy_function=shutil.copyfile)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return root


def texts(samples: list[cdlm.Sample]) -> list[str]:
    return [s.text for s in samples]


def state(loaded: cdlm.Pretrained) -> dict[str, torch.Tensor]:
    return loaded.method.modules().state_dict()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdlm.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_save_pretrained_round_trips_exactly_with_shards_and_a_card(run: Path, tmp_path: Path) -> None:
    loaded = cdlm.load_pretrained(run, device="cpu")
    assert loaded.weights == "ema" and loaded.step == 2 and loaded.kind == "cdlm"
    first = cdlm.save_pretrained(loaded, tmp_path / "a", max_shard_bytes=200_000)
    assert (first / "model.safetensors.index.json").is_file() and not (first / "model.safetensors").exists()
    card = (first / "README.md").read_text()
    assert "method: `elf`" in card and "training steps: 2" in card and "weights: ema" in card and "loss" in card
    again = cdlm.from_pretrained(first, device="cpu")
    assert again.kind == "hf" and again.weights == "ema" and again.step == 2
    a, b = state(loaded), state(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert texts(cdlm.sample(loaded, overrides=SAMPLE)) == texts(cdlm.sample(again, overrides=SAMPLE))
    second = cdlm.save_pretrained(again, tmp_path / "b", max_shard_bytes=200_000)
    assert json.loads((first / "config.json").read_text()) == json.loads((second / "config.json").read_text())
    shards = sorted(p.name for p in first.glob("model-*.safetensors"))
    assert shards == sorted(p.name for p in second.glob("model-*.safetensors")) and len(shards) > 1
    for name in shards:
        x, y = load_file(first / name), load_file(second / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_convert_to_a_checkpoint_directory_keeps_raw_and_ema_weights(run: Path, tmp_path: Path) -> None:
    dst = cdlm.convert(run, tmp_path / "ckpt", to="cdlm")
    ckpt = next((run / "checkpoints").iterdir())
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(ckpt / name), load_file(dst / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    raw = ["sample.use_ema=false", *SAMPLE]
    assert texts(cdlm.sample(dst, overrides=SAMPLE)) == texts(cdlm.sample(run, overrides=SAMPLE))
    assert texts(cdlm.sample(dst, overrides=raw)) == texts(cdlm.sample(run, overrides=raw))
    with pytest.raises(CheckpointError, match="format 'nope': no installed plugin writes it"):
        cdlm.convert(run, tmp_path / "x", to="nope")


def test_hub_id_is_read_from_the_local_cache_offline(run: Path, tmp_path: Path) -> None:
    exported = cdlm.save_pretrained(cdlm.load_pretrained(run, device="cpu"), tmp_path / "export")
    cache = hub_cache(tmp_path / "cache", "cdlm-test/elf-tiny", exported)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ["--num-samples", "2", "--steps", "3"]
    by_id = cli("sample", "--checkpoint", "cdlm-test/elf-tiny", *args, env=env)
    by_dir = cli("sample", "--checkpoint", str(exported), *args)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_dir.stdout and by_id.stdout.strip()
    missing = cli("sample", "--checkpoint", "cdlm-test/absent", env=env)
    assert missing.returncode == 2 and "cdlm-test/absent: not in the local Hugging Face cache" in missing.stderr


def test_cola_release_by_hub_id_samples_like_the_tree(tmp_path: Path) -> None:
    hf = cola_release(tmp_path)
    env = {"HF_HUB_CACHE": str(hub_cache(tmp_path / "cache", "cdlm-test/cola-tiny", hf)), "HF_HUB_OFFLINE": "1"}
    args = ["--prompt", "The meaning of", "--set", "model.per_sample_noise_seed=66", "--max-new-tokens", "16"]
    by_id = cli("sample", "--checkpoint", "cdlm-test/cola-tiny", *args, env=env)
    by_dir = cdlm.sample(hf, prompts=["The meaning of"], overrides=COLA_SAMPLE)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout.strip() == by_dir[0].text.strip()


def test_prompt_ids_key_the_noise_and_special_tokens_can_be_kept(tmp_path: Path) -> None:
    hf = cola_release(tmp_path)
    prompts = ["The meaning of", "Once upon a time there was", "A"]
    rows = [{"id": 7, "prompt": prompts[0]}, {"id": "q-12", "prompt": prompts[1]}, {"id": 3, "prompt": prompts[2]}]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # reversed order in the file
    out = tmp_path / "out.jsonl"
    done = cli("sample", "--checkpoint", str(hf), "--prompts-file", str(file), "-o", str(out), "--keep-special-tokens",
               "--set", "model.per_sample_noise_seed=66", "--max-new-tokens", "16")  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    loaded = cdlm.load_pretrained(hf, overrides=COLA_SAMPLE, device="cpu")
    samples = cdlm.sample(loaded, prompts=prompts, sample_ids=[7, "q-12", 3], keep_special_tokens=True)
    assert [records[s.id]["ids"] for s in samples] == [s.ids for s in samples]
    assert [records[s.id]["text"] for s in samples] == [s.text for s in samples]
    decoded = [loaded.tokenizer.decode(s.ids, skip_special_tokens=False) for s in samples]
    assert [s.text for s in samples] == [text.replace("\ufffd", "") for text in decoded]  # no split-byte fragments


def test_keep_special_tokens_decodes_them_into_the_text(tmp_path: Path) -> None:
    loaded = cdlm.load_pretrained(cola_release(tmp_path), overrides=COLA_SAMPLE, device="cpu")
    ids = [0, 5, 3, 2]  # <|endoftext|> " <|pad|> <|im_end|> in the fixture tokenizer
    loaded.method.pipeline = lambda request, generator, on_step=None: GenerateOutput([ids] * request.num_samples, 0)
    kept = cdlm.sample(loaded, prompts=["A"], keep_special_tokens=True)
    assert kept[0].text == '<|endoftext|>"<|pad|><|im_end|>' and kept[0].ids == ids
    assert cdlm.sample(loaded, prompts=["A"])[0].text == '"'


def elf_overrides(run: Path) -> list[str]:
    """What an official ELF checkpoint does not hold: the fixture's L, T5 encoder and a 512-token tokenizer."""
    encoder = shared_path("fixtures", "elf", "t5_encoder")
    return ["model.max_length=32", "data.seq_len=32", f"model.encoder.pretrained={encoder}",
            f"data.tokenizer={run / 'tokenizer.json'}"]  # fmt: skip


def test_official_elf_checkpoint_samples_converts_and_goes_back(run: Path, tmp_path: Path) -> None:
    official = shared_path("fixtures", "elf", "ckpt")
    payload = torch.load(official / "checkpoint_1", map_location="cpu", weights_only=True)
    overrides = elf_overrides(run)
    ema = cdlm.load_pretrained(official, overrides=overrides, device="cpu")
    raw = cdlm.load_pretrained(official / "checkpoint_1", overrides=[*overrides, "sample.use_ema=false"], device="cpu")
    assert (ema.kind, ema.weights, ema.step, raw.weights) == ("elf-official", "ema", 1, "raw")
    assert torch.equal(state(ema)["network.time_tokens"], payload["ema_params1"]["t_emb_tokens"])
    assert torch.equal(state(raw)["network.time_tokens"], payload["params"]["t_emb_tokens"])
    args = ["--num-samples", "2", "--steps", "3", *(x for o in overrides for x in ("--set", o))]
    by_cli = cli("sample", "--checkpoint", str(official), *args)
    assert by_cli.returncode == 0, by_cli.stderr
    assert by_cli.stdout.strip() == "\n\n".join(texts(cdlm.sample(ema, overrides=SAMPLE))).strip()
    converted = cli("convert", str(official), str(tmp_path / "cdlm"), *(x for o in overrides for x in ("--set", o)))
    assert converted.returncode == 0, converted.stderr
    back = cdlm.convert(tmp_path / "cdlm", tmp_path / "official", to="elf-official", overrides=["train.warmup_steps=0"])
    assert back.name == "checkpoint_1"
    again = torch.load(back, map_location="cpu", weights_only=True)
    for key in ("params", "ema_params1"):
        assert again[key].keys() == payload[key].keys()
        assert all(torch.equal(again[key][k], payload[key][k]) for k in payload[key])


def test_raw_weights_flag_samples_the_raw_weights(run: Path, tmp_path: Path) -> None:
    args = ["--num-samples", "2", "--steps", "3"]
    outs = {}
    for flag in ("--ema", "--raw-weights"):
        out = tmp_path / f"{flag.strip('-')}.jsonl"
        done = cli("sample", "--checkpoint", str(run), *args, flag, "-o", str(out))
        assert done.returncode == 0, done.stderr
        outs[flag] = [json.loads(line)["ids"] for line in out.read_text().splitlines()]
    for flag, use_ema in (("--ema", "true"), ("--raw-weights", "false")):
        api = cdlm.sample(run, overrides=[*SAMPLE, f"sample.use_ema={use_ema}"])
        assert outs[flag] == [s.ids for s in api]
    assert outs["--ema"] != outs["--raw-weights"]  # 2 steps: EMA and raw weights differ
