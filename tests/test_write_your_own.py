"""README "Write your own method": the ≤ 80-line example plugin trains and samples through the CLI and the API with
the core objective and pipeline, and ELF's components train and sample under another schedule from Python alone."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from typer.testing import CliRunner

import cdlm
from cdlm.cli.__main__ import app
from cdlm.errors import PluginError
from cdlm.interfaces import Denoiser, Discretizer, Embedder, FlowSchedule, Objective, Pipeline
from cdlm.objective import FlowMatchingObjective
from cdlm.pipeline import FlowPipeline
from cdlm.registry import get_method
from toy_plugin.register import ENTRY_POINT, TOY_ROOT, register_toy

REPO = Path(__file__).resolve().parents[1]
RECIPE = """\
method: toy
model: {vocab_size: 300}
data: {source: builtin:pydoc, vocab_size: 300, seq_len: 16, max_rows: 40}
train: {steps: 3, batch_size: 4, optimizer: adamw, lr: 1.0e-3, log_every: 1, save_every: 3}
sample: {num_samples: 3, steps: 4, sampler: heun}
"""


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_example_plugin_is_one_file_of_at_most_80_lines() -> None:
    source = TOY_ROOT / "cdlm_toy" / "__init__.py"
    assert len(source.read_text().splitlines()) <= 80
    assert "examples/toy-plugin/cdlm_toy/__init__.py" in readme_section("Write your own method")


def test_the_example_declares_the_entry_point_the_tests_install() -> None:
    pyproject = (TOY_ROOT / "pyproject.toml").read_text()
    table = pyproject.split('[project.entry-points."cdlm.plugins"]\n', 1)[1].split("\n[", 1)[0]
    assert [line.replace('"', "") for line in table.splitlines() if line.strip()] == [ENTRY_POINT]


def test_the_example_writes_only_components_and_gets_the_core_objective_and_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_toy(tmp_path, monkeypatch)
    spec = get_method("toy")
    module = importlib.import_module("cdlm_toy")
    kinds = (Embedder, Denoiser, FlowSchedule, Discretizer, Objective, Pipeline)
    written = {kind for value in vars(module).values() for kind in kinds if _defines(module, value, kind)}
    assert written == {Embedder, Denoiser, Discretizer}  # the schedule is the core's XPredictionSchedule
    method = spec.build(cdlm.load_recipe(str(_recipe(tmp_path))))
    assert type(method.objective) is FlowMatchingObjective and type(method.pipeline) is FlowPipeline
    assert method.objective.discretizer is None  # nearest embedding: nothing to train, no cross-entropy term


def test_a_method_without_objective_or_pipeline_needs_its_latent_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_toy(tmp_path, monkeypatch)
    method = get_method("toy").build(cdlm.load_recipe(str(_recipe(tmp_path))))
    with pytest.raises(PluginError, match="these are missing: latent_shape; a plugin's build passes"):
        dataclasses.replace(method, objective=None, pipeline=None, latent_shape=None)


def _defines(module: ModuleType, value: object, kind: type) -> bool:
    return isinstance(value, type) and value.__module__ == module.__name__ and issubclass(value, kind)


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(RECIPE)
    return path


def test_the_example_trains_and_samples_through_the_cli_and_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_toy(tmp_path, monkeypatch)
    recipe, out = _recipe(tmp_path), tmp_path / "samples.jsonl"
    cli = CliRunner()
    trained = cli.invoke(app, ["train", "--recipe", str(recipe), "-o", str(tmp_path / "cli")], catch_exceptions=False)
    assert trained.exit_code == 0, trained.output
    sampled = cli.invoke(app, ["sample", "-c", str(tmp_path / "cli"), "-o", str(out)], catch_exceptions=False)
    assert sampled.exit_code == 0, sampled.output
    from_cli = [json.loads(line) for line in out.read_text().splitlines()]

    result = cdlm.train(cdlm.load_recipe(str(recipe)), tmp_path / "api")
    from_api = cdlm.sample(tmp_path / "api")
    assert result.step == 3 and set(result.metrics) >= {"loss", "mse"} and math.isfinite(result.metrics["mse"])
    assert [s.ids for s in from_api] == [r["ids"] for r in from_cli]  # the same run either way
    assert len(from_api) == 3 and all(len(s.ids) == 16 and max(s.ids) < 300 for s in from_api)


def test_the_readme_reuses_elfs_components_under_another_schedule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", readme_section("Write your own method"), re.DOTALL)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert capsys.readouterr().out.strip()
    elf, objective, samples = scope["elf"], scope["objective"], scope["samples"]
    assert type(objective).__mro__[1] is FlowMatchingObjective and objective.schedule is scope["schedule"]
    assert objective.schedule.noise_scale == 1.0 and objective.discretizer is elf.discretizer  # trained by CE
    fresh = cdlm.build(cdlm.load_recipe("elf-tiny")).trainable["network"]
    trained = elf.trainable["network"]
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), fresh.parameters(), strict=True))
    assert samples.nfe == 3 * 2 + 1  # Heun on 4 steps, the last a plain Euler step
    assert len(samples.ids) == 2 and all(len(row) == 64 for row in samples.ids)
