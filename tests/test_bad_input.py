"""Bad input through the CLI and the API: a one-line error naming the flag, field or file, exit code 2, no file harmed.

Most CLI cases run in-process (``cdlm.cli.__main__.main``, which maps a CdlmError to ``error: …`` and exit 2
exactly as the ``cdlm`` command does); a few run as real subprocesses. One tiny trained ELF run serves the module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import cdlm
from cdlm.cli.__main__ import main
from cdlm.errors import CdlmError
from cdlm.interfaces import GenerateRequest
from tiny import SMALL_BPE

# elf-tiny without its masked-LM encoder stage (tests/plugins/elf/test_encoder_pretraining.py covers it)
TINY = [
    *["stages=[]", "train.steps=2", "train.batch_size=4", "train.save_every=1", "data.max_rows=40", "model.depth=1"],
    *SMALL_BPE,
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step ELF run with checkpoints at steps 1 and 2 (never changed by a test: cases use :func:`copy`)."""
    path = tmp_path_factory.mktemp("bad-input") / "run"
    cdlm.train(cdlm.load_recipe("elf-tiny", TINY), path)
    return path


@pytest.fixture(scope="module")
def loaded(run: Path) -> cdlm.Pretrained:
    return cdlm.load_pretrained(run, device="cpu")


def copy(run: Path, where: Path) -> Path:
    return Path(shutil.copytree(run, where / "run"))


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path → its SHA-256 (what "no file harmed" compares)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run ``cdlm ARGS`` in-process; return the exit code and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    return exited.value.code, capsys.readouterr().err


def assert_one_clean_error(code: int, err: str, *named: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for text in named:
        assert text in err, f"{text!r} not in {err!r}"


# ---------------------------------------------------------------------------------------------------- cdlm train
TRAIN = ["train", "-r", "elf-tiny", *(a for s in TINY for a in ("--set", s))]

TRAIN_CASES: list[tuple[str, list[str], list[str]]] = [
    # (id, extra args ({run} = a copy of the trained run, {tmp} = a scratch dir), texts the message names)
    ("output-dir-is-a-file", ["-o", "{run}/config.yaml"], ["--output-dir", "config.yaml", "is an existing file"]),
    ("output-dir-inside-a-file", ["-o", "{run}/config.yaml/sub"], ["--output-dir", "config.yaml", "not a directory"]),
    ("resume-other-architecture", ["-o", "{run}", "--set", "model.depth=2"], ["config.yaml", "model.depth: 1 → 2"]),
    ("resume-other-data", ["-o", "{run}", "--set", "data.max_rows=30"], ["config.yaml", "data.max_rows: 40 → 30"]),
    ("stage-without-stages", ["-o", "{run}", "--stage", "vae"], ["--stage vae", "no stages"]),
    ("missing-equals", ["-o", "{run}", "--set", "train.steps"], ["--set train.steps", "expected KEY=VALUE"]),
    ("unknown-field", ["-o", "{run}", "--set", "train.stepz=3"], ["--set train.stepz=3", "did you mean 'steps'"]),
    ("ill-typed", ["-o", "{run}", "--set", "train.lr=fast"], ["--set train.lr=fast", "train.lr"]),
    ("infinite-lr", ["-o", "{run}", "--set", "train.lr=.inf"], ["--set train.lr=.inf", "finite"]),
    ("nan-lr", ["-o", "{run}", "--set", "train.lr=.nan"], ["--set train.lr=.nan", "finite"]),
    ("seq-len-vs-max-length", ["-o", "{run}", "--set", "data.seq_len=128"], ["data.seq_len", "model.max_length 64"]),
    ("max-length-vs-seq-len", ["-o", "{run}", "--set", "model.max_length=32"], ["--set model.max_length=32"]),
    ("negative-time-limit", ["-o", "{run}", "--set", "train.max_minutes=-1"], ["train.max_minutes"]),
    ("negative-threads", ["-o", "{run}", "--set", "train.num_threads=-1"], ["train.num_threads"]),
    ("section-is-a-value", ["-o", "{run}", "--set", "seed.x=1"], ["--set seed.x=1", "not a section"]),
    ("no-such-recipe", ["-r", "elf-tiyn", "-o", "{tmp}/r"], ["elf-tiyn", "did you mean 'elf-tiny'"]),
    ("no-such-source-name", ["-o", "{tmp}/r", "--set", "data.source=mycorpus"], ["data.source 'mycorpus'"]),
    ("no-such-source-path", ["-o", "{tmp}/r", "--set", "data.source=./none.txt"], ["./none.txt", "no such file"]),
    ("empty-data-file", ["-o", "{tmp}/r", "--set", "data.source={tmp}/empty.jsonl"], ["empty.jsonl", "empty"]),
    ("not-utf8-data", ["-o", "{tmp}/r", "--set", "data.source={tmp}/latin1.txt"], ["latin1.txt", "UTF-8"]),
    ("broken-jsonl-data", ["-o", "{tmp}/r", "--set", "data.source={tmp}/broken.jsonl"], ["broken.jsonl"]),
    (
        "no-such-column",
        ["-o", "{tmp}/r", "--set", "data.source={tmp}/ok.jsonl", "--set", "data.text_field=body"],
        ["data.text_field 'body'", "no such column"],
    ),  # fmt: skip
    ("batch-too-large", ["-o", "{tmp}/r", "--set", "train.batch_size=4096"], ["train.batch_size=4096"]),
    ("bpe-above-model-vocab", ["-o", "{tmp}/r", "--set", "data.vocab_size=1024"], ["data.vocab_size: 1024"]),
    ("other-methods-setting", ["-o", "{tmp}/r", "--set", "sample.max_new_tokens=8"], ["method 'elf'"]),
]


def data_files(tmp: Path) -> None:
    (tmp / "empty.jsonl").write_bytes(b"")
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n\nd\xe9j\xe0 vu\n".encode("latin-1"))
    (tmp / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp / "ok.jsonl").write_text('{"text": "some words here"}\n')


@pytest.mark.parametrize(("args", "named"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], named: list[str]
) -> None:
    mine = copy(run, tmp_path)
    data_files(tmp_path)
    before = snapshot(mine)
    start = time.monotonic()
    code, err = cli(capsys, *TRAIN, *(a.format(run=mine, tmp=tmp_path) for a in args))
    assert_one_clean_error(code, err, *(n.format(run=mine, tmp=tmp_path) for n in named))
    assert snapshot(mine) == before
    assert time.monotonic() - start < 30  # no hub retries


def test_train_a_bad_stage_or_another_method_leaves_the_run_alone(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = copy(run, tmp_path)
    before = snapshot(mine)
    code, err = cli(capsys, "train", "-r", "cola-tiny", "-o", str(mine), "--stage", "nope")
    assert_one_clean_error(code, err, "--stage nope", "['vae', 'joint']")
    code, err = cli(capsys, "train", "-r", "cola-tiny", "-o", str(mine), "--set", "stages.vea.train.steps=1")
    assert_one_clean_error(code, err, "--set stages.vea.train.steps=1", "no stage 'vea'")
    code, err = cli(capsys, "train", "-r", "cola-tiny", "-o", str(mine), "--set", "stages.vae.train.steps=0")
    assert_one_clean_error(code, err, "--set stages.vae.train.steps=0", "train.steps")
    code, err = cli(capsys, "train", "-r", "cola-tiny", "-o", str(mine), "--stage", "vae")  # an ELF run directory
    assert_one_clean_error(code, err, "config.yaml", "holds a run of method 'elf', not 'cola'")
    assert snapshot(mine) == before


def test_train_with_every_checkpoint_damaged_names_them(run: Path, tmp_path: Path, capsys) -> None:
    mine = copy(run, tmp_path)
    for ckpt in (mine / "checkpoints").iterdir():
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    before = snapshot(mine)
    code, err = cli(capsys, *TRAIN, "-o", str(mine), "--set", "train.steps=3")
    assert_one_clean_error(code, err, "no readable checkpoint", "model.safetensors")
    assert snapshot(mine) == before


# --------------------------------------------------------------------------------------------------- cdlm sample
SAMPLE_CASES: list[tuple[str, list[str], list[str]]] = [
    ("no-such-checkpoint", ["-c", "{tmp}/nowhere"], ["nowhere", "no such file or directory"]),
    ("empty-directory", ["-c", "{tmp}/empty"], ["empty", "not a cdlm run"]),
    ("weights-without-config", ["-c", "{tmp}/weights-only"], ["weights-only", "model.safetensors but no config.yaml"]),
    ("neither-source", [], ["--checkpoint", "--recipe"]),
    ("both-sources", ["-c", "{run}", "-r", "elf-tiny"], ["--checkpoint", "--recipe"]),
    ("zero-samples", ["-c", "{run}", "--num-samples", "0"], ["--num-samples 0", "sample.num_samples"]),
    ("zero-steps", ["-c", "{run}", "--steps", "0"], ["--steps 0", "sample.steps"]),
    ("unknown-sampler", ["-c", "{run}", "--sampler", "rk4"], ["--sampler rk4", "sample.sampler"]),
    ("top-p-above-one", ["-c", "{run}", "--top-p", "2"], ["--top-p 2", "sample.top_p"]),
    ("negative-temperature", ["-c", "{run}", "--temperature", "-1"], ["--temperature -1", "sample.temperature"]),
    ("nan-self-cond-scale", ["-c", "{run}", "--set", "sample.self_cond_scale=.nan"], ["sample.self_cond_scale"]),
    ("inf-grid-mean", ["-c", "{run}", "--set", "sample.grid_mean=.inf"], ["--set sample.grid_mean=.inf", "finite"]),
    ("cfg-unconditional", ["-c", "{run}", "--cfg", "7"], ["sample.guidance=7.0", "--guidance"]),
    ("prompt-unconditional", ["-c", "{run}", "--prompt", "The"], ["--prompt", "data.source_field"]),
    ("prompts-file-missing", ["-c", "{run}", "--prompts-file", "{tmp}/none.jsonl"], ["--prompts-file", "none.jsonl"]),
    ("prompts-file-not-utf8", ["-c", "{run}", "--prompts-file", "{tmp}/latin1.jsonl"], ["latin1.jsonl", "UTF-8"]),
    ("prompts-file-null-prompt", ["-c", "{run}", "--prompts-file", "{tmp}/null.jsonl"], ["null.jsonl:1", '"prompt"']),
    ("prompts-file-number-prompt", ["-c", "{run}", "--prompts-file", "{tmp}/num.jsonl"], ["num.jsonl:2", "string"]),
    ("prompts-file-not-json", ["-c", "{run}", "--prompts-file", "{tmp}/text.jsonl"], ["text.jsonl:1", "not JSON"]),
    ("prompts-file-bad-id", ["-c", "{run}", "--prompts-file", "{tmp}/id.jsonl"], ["id.jsonl:1", '"id"']),
    ("prompts-file-empty", ["-c", "{run}", "--prompts-file", "{tmp}/empty.jsonl"], ["empty.jsonl", "no prompts"]),
    ("output-inside-a-file", ["-c", "{run}", "-o", "{run}/config.yaml/out.jsonl"], ["--output", "not a directory"]),
    ("output-into-proc", ["-c", "{run}", "-o", "/proc/cdlm-out.jsonl"], ["--output /proc/cdlm-out.jsonl"]),
    ("output-is-a-directory", ["-c", "{run}", "-o", "{tmp}"], ["--output", "is a directory"]),
    ("non-sample-flag-type", ["-c", "{run}", "--num-samples", "many"], ["--num-samples"]),
    ("flag-elf-does-not-use", ["-c", "{run}", "--max-new-tokens", "8"], ["--max-new-tokens 8", "method 'elf'"]),
    (
        "flags-elf-does-not-use",
        ["-c", "{run}", "--repetition-penalty", "1.1", "--max-new-tokens", "8"],
        ["--max-new-tokens 8, --repetition-penalty 1.1", "method 'elf'", "it takes are --num-samples, --steps"],
    ),  # fmt: skip
    ("set-elf-does-not-use", ["-c", "{run}", "--set", "sample.top_k=2", "--set", "sample.guidance=2"], ["guidance"]),
    ("recipe-flag-unused", ["-r", "elf-tiny", "--max-new-tokens", "8"], ["--max-new-tokens 8", "method 'elf'"]),
]


def prompt_files(tmp: Path, run: Path) -> None:
    (tmp / "empty").mkdir()
    (tmp / "weights-only").mkdir()
    shutil.copyfile(
        run / "checkpoints" / "step-00000002" / "model.safetensors", tmp / "weights-only" / "model.safetensors"
    )
    (tmp / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    (tmp / "null.jsonl").write_text('{"prompt": null}\n')
    (tmp / "num.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    (tmp / "text.jsonl").write_text("just a line of text\n")
    (tmp / "id.jsonl").write_text('{"prompt": "a", "id": [1]}\n')
    (tmp / "empty.jsonl").write_text("\n")


@pytest.mark.parametrize(("args", "named"), [c[1:] for c in SAMPLE_CASES], ids=[c[0] for c in SAMPLE_CASES])
def test_sample_bad_input(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], named: list[str]
) -> None:
    mine = copy(run, tmp_path)
    prompt_files(tmp_path, mine)
    before = snapshot(mine)
    code, err = cli(capsys, "sample", "--steps", "2", *(a.format(run=mine, tmp=tmp_path) for a in args))
    if args[-2:] == ["--num-samples", "many"]:  # a flag's own type: the parser's usage error, also exit 2
        assert code == 2 and "--num-samples" in err and "Traceback" not in err
    else:
        assert_one_clean_error(code, err, *(n.format(run=mine, tmp=tmp_path) for n in named))
    assert snapshot(mine) == before
    assert not (mine / "out.jsonl").exists()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated-weights": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:100]),
    "garbage-weights": lambda c: (c / "model.safetensors").write_bytes(os.urandom(4096)),
    "missing-ema": lambda c: (c / "ema.safetensors").unlink(),
    "garbage-config": lambda c: (c / "config.yaml").write_text("method: [unclosed\n"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_sample_from_a_damaged_checkpoint_names_the_file(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    mine = copy(run, tmp_path)
    latest = mine / "checkpoints" / "step-00000002"
    DAMAGE[damage](latest)
    before = snapshot(mine)
    code, err = cli(capsys, "sample", "-c", str(mine), "--steps", "2")
    assert_one_clean_error(code, err, str(latest))
    assert snapshot(mine) == before


# ------------------------------------------------------------------------------------------- convert and recipes
OTHER_CASES: list[tuple[str, list[str], list[str]]] = [
    ("convert-unknown-target", ["convert", "{run}", "{tmp}/out", "--to", "onnx"], ["onnx", "elf-official"]),
    ("convert-no-source", ["convert", "{tmp}/nowhere", "{tmp}/out"], ["nowhere"]),
    ("recipes-show-unknown", ["recipes", "show", "elf-tinny"], ["elf-tinny", "did you mean"]),
    ("recipes-show-bad-set", ["recipes", "show", "elf-tiny", "--set", "sample.sampler=rk4"], ["sample.sampler"]),
    ("recipe-file-bad-yaml", ["recipes", "show", "{tmp}/bad.yaml"], ["bad.yaml", "not valid YAML"]),
    ("recipe-file-unknown-field", ["recipes", "show", "{tmp}/typo.yaml"], ["typo.yaml", "train.stepz"]),
    ("recipe-file-not-a-mapping", ["recipes", "show", "{tmp}/list.yaml"], ["list.yaml", "mapping"]),
    ("recipe-extends-cycle", ["recipes", "show", "{tmp}/cycle.yaml"], ["cycle.yaml", "cycle"]),
    ("recipe-unknown-method", ["recipes", "show", "{tmp}/method.yaml"], ["method.yaml", "not installed"]),
    ("recipes-show-other-method", ["recipes", "show", "cola-tiny", "--set", "sample.churn=1"], ["method 'cola'"]),
    ("recipe-file-other-method", ["recipes", "show", "{tmp}/churn.yaml"], ["churn.yaml", "sample.churn", "'cola'"]),
]


@pytest.mark.parametrize(("args", "named"), [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_convert_and_recipes_bad_input(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], named: list[str]
) -> None:
    (tmp_path / "bad.yaml").write_text("train: {steps: [1\n")
    (tmp_path / "typo.yaml").write_text("extends: elf-tiny\ntrain: {stepz: 3}\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "cycle.yaml").write_text("extends: cycle.yaml\n")
    (tmp_path / "method.yaml").write_text("method: nosuch\nmodel: {}\n")
    (tmp_path / "churn.yaml").write_text("extends: cola-tiny\nsample: {churn: 1.5}\n")
    before = snapshot(run)
    code, err = cli(capsys, *(a.format(run=run, tmp=tmp_path) for a in args))
    assert_one_clean_error(code, err, *(n.format(run=run, tmp=tmp_path) for n in named))
    assert snapshot(run) == before
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- Python API
def api_cases(run: Path, loaded: cdlm.Pretrained, tmp: Path) -> dict[str, tuple[Callable[[], object], list[str]]]:
    config = cdlm.load_recipe("elf-tiny", TINY)
    cases: dict[str, tuple[Callable[[], object], list[str]]] = {
        "train-a-dict": (lambda: cdlm.train({"method": "elf"}, tmp / "r"), ["config", "RunConfig", "dict"]),
        "train-into-a-file": (lambda: cdlm.train(config, run / "config.yaml"), ["config.yaml", "existing file"]),
        "overrides-one-string": (lambda: cdlm.load_recipe("elf-tiny", "train.steps=2"), ["overrides=", "one string"]),
        "overrides-not-strings": (lambda: cdlm.load_recipe("elf-tiny", [3]), ["overrides", "KEY=VALUE"]),
        "sample-overrides-string": (lambda: cdlm.sample(loaded, overrides="sample.steps=2"), ["overrides="]),
        "load-overrides-string": (lambda: cdlm.load_pretrained(run, overrides="sample.steps=2"), ["overrides="]),
        "device-unknown": (lambda: cdlm.load_pretrained(run, device="tpu9"), ["device='tpu9'"]),
        "device-absent-gpu": (lambda: cdlm.load_pretrained(run, device="cuda:99"), ["device='cuda:99'", "CUDA"]),
        "prompts-one-string": (lambda: cdlm.sample(loaded, prompts="hey"), ["prompts='hey'", "prompts=['hey']"]),
        "prompts-none-entry": (lambda: cdlm.sample(loaded, prompts=[None]), ["prompts[0]", "NoneType"]),
        "prompts-number-entry": (lambda: cdlm.sample(loaded, prompts=["a", 3]), ["prompts[1]", "int"]),
        "prompts-empty-list": (lambda: cdlm.sample(loaded, prompts=[]), ["prompts", "empty"]),
        "prompts-not-a-list": (lambda: cdlm.sample(loaded, prompts=42), ["prompts", "int"]),
        "sample-ids-count": (lambda: cdlm.sample(loaded, sample_ids=[1]), ["sample_ids", "4 samples"]),
        "loaded-non-sample-override": (lambda: cdlm.sample(loaded, overrides=["train.lr=1"]), ["train.lr=1"]),
        "sample-nan-scale": (
            lambda: cdlm.sample(run, overrides=["sample.self_cond_scale=.nan"]),
            ["sample.self_cond_scale", "finite"],
        ),
        "sample-cfg-unconditional": (
            lambda: cdlm.sample(loaded, overrides=["sample.guidance=7"]),
            ["sample.guidance=7.0"],
        ),
        "sample-prompt-unconditional": (lambda: cdlm.sample(loaded, prompts=["The"]), ["data.source_field"]),
        "convert-unknown-target": (lambda: cdlm.convert(run, tmp / "out", to="onnx"), ["onnx"]),
        "load-nowhere": (lambda: cdlm.load_pretrained(tmp / "nowhere"), ["nowhere"]),
        "stage-on-single-stage": (lambda: cdlm.train(config, run, stage="vae"), ["--stage vae"]),
        "sample-elf-does-not-use": (
            lambda: cdlm.sample(loaded, overrides=["sample.max_new_tokens=8"]),
            ["--set sample.max_new_tokens=8", "unknown field for method 'elf'"],
        ),
        "build-bypassing-validation": (
            lambda: cdlm.build(config.model_copy(update={"data": config.data.model_copy(update={"seq_len": 32})})),
            ["data.seq_len: 32", "model.max_length 64"],
        ),
    }
    if not torch.cuda.is_available():
        cases["device-cuda-without-cuda"] = (lambda: cdlm.load_pretrained(run, device="cuda"), ["device='cuda'"])
    return cases


API_NAMES = [
    "train-a-dict", "train-into-a-file", "overrides-one-string", "overrides-not-strings", "sample-overrides-string",
    "load-overrides-string", "device-unknown", "device-absent-gpu", "prompts-one-string", "prompts-none-entry",
    "prompts-number-entry", "prompts-empty-list", "prompts-not-a-list", "sample-ids-count",
    "loaded-non-sample-override", "sample-nan-scale", "sample-cfg-unconditional", "sample-prompt-unconditional",
    "convert-unknown-target", "load-nowhere", "stage-on-single-stage", "device-cuda-without-cuda",
    "sample-elf-does-not-use", "build-bypassing-validation",
]  # fmt: skip


@pytest.mark.parametrize("name", API_NAMES)
def test_api_bad_input(run: Path, loaded: cdlm.Pretrained, tmp_path: Path, name: str) -> None:
    cases = api_cases(run, loaded, tmp_path)
    if name not in cases:
        pytest.skip("this machine has CUDA")
    call, named = cases[name]
    before = snapshot(run)
    with pytest.raises(CdlmError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    for text in named:
        assert text in message, f"{text!r} not in {message!r}"
    assert snapshot(run) == before


def test_cola_max_new_tokens_is_bounded_before_any_work() -> None:
    with pytest.raises(CdlmError, match=r"sample.max_new_tokens: 100000 new tokens exceed model.max_length 4096"):
        cdlm.load_recipe("cola-tiny", ["sample.max_new_tokens=100000"])  # alone above the limit: the recipe's error
    config = cdlm.load_recipe("cola-tiny", ["sample.max_new_tokens=4095"])  # with a prompt: the pipeline's
    method = cdlm.build(config)
    start = time.monotonic()
    with pytest.raises(CdlmError, match=r"sample.max_new_tokens=4095 \(--max-new-tokens\).*model.max_length=4096"):
        method.pipeline(GenerateRequest(1, [[5, 6]], config.sample), torch.Generator())
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------------- real subprocesses
def real_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cdlm.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_real_command_exits_2_with_one_line(run: Path, tmp_path: Path) -> None:
    mine = copy(run, tmp_path)
    before = snapshot(mine)
    out = real_cli("train", "-r", "elf-tiny", "-o", str(mine), *(a for s in TINY for a in ("--set", s)),
                   "--set", "model.depth=2")  # fmt: skip
    assert_one_clean_error(out.returncode, out.stderr, "model.depth: 1 → 2")
    out = real_cli("sample", "-c", str(mine), "--output", str(mine / "config.yaml" / "x.jsonl"))
    assert_one_clean_error(out.returncode, out.stderr, "--output", "not a directory")
    assert snapshot(mine) == before
