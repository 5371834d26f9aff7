"""ELF's released format (``checkpoint_<N>``): detection, reading the reference checkpoint, writing it back."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from cdlm.config import RunConfig
from cdlm.errors import CheckpointError
from cdlm.interfaces import ReleasedCheckpoint
from cdlm.recipes import set_dotted, validate
from cdlm.registry import get_method
from cdlm.training.optim import Muon
from cdlm_elf.released import ElfOfficialCheckpoint, _mlp_ratio, _recipe
from cdlm_elf.state_dict import ElfStateDictAdapter
from conftest import shared_path
from elf_fixture import fixture_config

ATOL = 1e-5
FORMAT = ElfOfficialCheckpoint()
NETWORK_FIELDS = (
    "latent_dim",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "bottleneck_dim",
    "num_time_tokens",
    "num_self_cond_cfg_tokens",
    "num_mode_tokens",
    "vocab_size",
)


def fixture_file() -> Path:
    return shared_path("fixtures", "elf", "ckpt", "checkpoint_1")


def reference() -> dict[str, Any]:
    return torch.load(fixture_file(), map_location="cpu", weights_only=True)


def run_config(recipe: dict[str, Any], *overrides: str) -> RunConfig:
    """Apply ``--set`` style edits to a copy of a read recipe and validate it (what the core does)."""
    raw = copy.deepcopy(recipe)
    encoder = shared_path("fixtures", "elf", "t5_encoder")
    for item in (f"model.encoder.pretrained={encoder}", "model.max_length=32", "data.seq_len=32", *overrides):
        set_dotted(raw, item)
    return validate(raw)


def assert_identical(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def released() -> ReleasedCheckpoint:
    return FORMAT.read(fixture_file())


def test_spec_registers_the_format() -> None:
    assert [f.name for f in get_method("elf").released_formats] == ["elf-official"]


def test_detect(tmp_path: Path) -> None:
    assert FORMAT.detect(fixture_file()) and FORMAT.detect(fixture_file().parent)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "config.yaml").write_text("method: elf\n")
    (run / ".checkpoint_3.abc.tmp").write_bytes(b"partial")
    (run / "checkpoint_x").write_bytes(b"")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 8)
    assert not FORMAT.detect(run) and not FORMAT.detect(run / "config.yaml")
    assert not FORMAT.detect(tmp_path / "weights.bin") and not FORMAT.detect(tmp_path / "absent")


def test_read_infers_the_fixture_config(released: ReleasedCheckpoint) -> None:
    model = run_config(released.recipe).model
    expected = fixture_config()
    assert {k: getattr(model, k) for k in NETWORK_FIELDS} == {k: getattr(expected, k) for k in NETWORK_FIELDS}
    assert released.recipe["data"]["seq_len"] == released.recipe["model"]["max_length"]  # from the base recipe
    assert released.step == 1
    assert validate(released.recipe).model.encoder.pretrained == "t5-small"  # valid as read; no size matches: ELF-B's


@pytest.mark.parametrize(("hidden", "depth", "heads", "base"), [(1056, 24, 16, "elf-342m"), (1280, 32, 16, "elf-652m")])
def test_paper_sizes_pick_their_recipe(hidden: int, depth: int, heads: int, base: str) -> None:
    shape = {"hidden_size": hidden, "depth": depth, "num_heads": heads, "vocab_size": 32100}
    raw = _recipe(shape, Path("checkpoint_9"))
    assert f"from {base}" in raw["description"] and raw["sample"]["steps"] == 64
    assert validate(raw).model.depth == depth and raw["data"]["seq_len"] == raw["model"]["max_length"] == 1024


def test_read_maps_params_and_ema(released: ReleasedCheckpoint) -> None:
    ckpt, adapter = reference(), ElfStateDictAdapter(fixture_config())
    assert_identical(released.weights, adapter.from_official(ckpt["params"]))
    assert released.ema is not None
    assert_identical(released.ema, adapter.from_official(ckpt["ema_params1"]))


@pytest.mark.parametrize("weights", ["ema_params1", "params"])
def test_built_model_loads_strictly_and_matches_reference(released: ReleasedCheckpoint, weights: str) -> None:
    method = get_method("elf").build(run_config(released.recipe))
    sd = released.ema if weights == "ema_params1" else released.weights
    network = method.trainable["network"].eval()
    nn.ModuleDict({"network": network}).load_state_dict(sd, strict=True)
    data = load_file(shared_path("fixtures", "elf", "forward_ckpt.safetensors"))
    with torch.no_grad():
        out, logits = network(data["in/x"], data["in/t"], data["in/sc"])
    assert logits is None
    torch.testing.assert_close(out, data[f"out_{weights}/output"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("hidden", "inner"), [(768, 2048), (1056, 2816), (1280, 3413), (64, 170)])
def test_mlp_ratio_inverts_the_swiglu_width(hidden: int, inner: int) -> None:
    assert _mlp_ratio(hidden, inner, Path("x")) == 4.0
    assert int(int(128 * _mlp_ratio(128, 300, Path("x"))) * 2 / 3) == 300  # an odd width rebuilds exactly


def test_write_reproduces_the_reference_layout(released: ReleasedCheckpoint, tmp_path: Path) -> None:
    config = run_config(released.recipe, "train.warmup_steps=0")  # the fixture step ran without warm-up
    weights = {**released.weights, "embedder.t5.shared.weight": torch.zeros(2, 2)}  # frozen keys are dropped
    out = FORMAT.write(tmp_path / "out", config=config, weights=weights, ema=released.ema, step=1, tokenizer=None)
    assert out == tmp_path / "out" / "checkpoint_1" and sorted(p.name for p in out.parent.iterdir()) == [out.name]
    written, ckpt = torch.load(out, map_location="cpu", weights_only=True), reference()
    assert list(written) == list(ckpt)
    assert_identical(written["params"], ckpt["params"])
    assert_identical(written["ema_params1"], ckpt["ema_params1"])
    assert written["opt_state"] == {"state": {}, "param_groups": ckpt["opt_state"]["param_groups"]}
    assert written["lr_scheduler"] == ckpt["lr_scheduler"]
    assert (written["step"], written["epoch"], written["grad_accum_buffers"]) == (1, 0, {})
    rng = written["dropout_rng"]
    assert rng.dtype == ckpt["dropout_rng"].dtype and rng.shape == ckpt["dropout_rng"].shape
    torch.Generator().set_state(rng)


def test_written_optimizer_state_loads_into_a_two_group_optimizer(released: ReleasedCheckpoint, tmp_path: Path) -> None:
    config = run_config(released.recipe)
    out = FORMAT.write(tmp_path, config=config, weights=released.weights, ema=None, step=7, tokenizer=None)
    written = torch.load(out, map_location="cpu", weights_only=True)
    params = [p.clone() for p in written["params"].values()]
    optimizer = Muon([p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2], lr=1.0)
    optimizer.load_state_dict(written["opt_state"])
    schedule = LambdaLR(optimizer, lambda s: 1.0)
    schedule.load_state_dict(written["lr_scheduler"])
    assert schedule.last_epoch == 7 and written["lr_scheduler"]["_step_count"] == 8
    assert written["opt_state"]["param_groups"][0]["lr"] == pytest.approx(2e-3 * 7 / 9508)  # elf-105m warm-up
    assert_identical(written["ema_params1"], written["params"])  # ema=None: the raw weights stand in


def test_write_then_read_round_trips_bit_exactly(released: ReleasedCheckpoint, tmp_path: Path) -> None:
    config = run_config(released.recipe)
    for step in (5, 12):
        FORMAT.write(tmp_path, config=config, weights=released.weights, ema=released.ema, step=step, tokenizer=None)
    again = FORMAT.read(tmp_path)  # the largest step wins
    assert again.step == 12 and again.recipe == released.recipe | {"description": again.recipe["description"]}
    assert_identical(again.weights, released.weights)
    assert again.ema is not None and released.ema is not None
    assert_identical(again.ema, released.ema)


def test_read_without_ema_or_step(tmp_path: Path) -> None:
    file = tmp_path / "checkpoint_3"
    torch.save({"params": reference()["params"]}, file)
    got = FORMAT.read(file)
    assert got.ema is None and got.step is None and len(got.weights) == 47


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "checkpoint_2"
    corrupt.write_bytes(fixture_file().read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(corrupt))}: not a readable torch.save payload"):
        FORMAT.read(corrupt)
    text = tmp_path / "checkpoint_4"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(text))}: not a readable torch.save payload"):
        FORMAT.read(text)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(tmp_path / 'empty'))}: holds no checkpoint_<N> file"):
        (tmp_path / "empty").mkdir()
        FORMAT.read(tmp_path / "empty")


def test_payload_without_params_names_the_file_and_keys(tmp_path: Path) -> None:
    file = tmp_path / "checkpoint_1"
    torch.save({"step": 1, "epoch": 0}, file)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(file))}: no 'params' key.*found: \['epoch', 'step'\]"):
        FORMAT.read(file)
    torch.save([1, 2], file)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(file))}: torch.load gave a list"):
        FORMAT.read(file)


def test_weights_that_do_not_fit_name_the_file_and_key(tmp_path: Path) -> None:
    params = dict(reference()["params"])
    file = tmp_path / "checkpoint_1"
    torch.save({"params": {**params, "blocks.1.attn.qkv.weight": torch.zeros(3, 3)}}, file)
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(file))}: params tensors do not fit.*blocks\.1\.attn\.qkv\.weight"
    ):
        FORMAT.read(file)
    torch.save({"params": {k: v for k, v in params.items() if k != "t_emb_tokens"}}, file)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(file))}: params\['t_emb_tokens'\] is missing"):
        FORMAT.read(file)
    torch.save({"params": {**params, "extra": torch.zeros(1)}}, file)
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(file))}: official ELF state dict: 0 missing.*\(extra\)"
    ):
        FORMAT.read(file)
