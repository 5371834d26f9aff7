"""Plugins are found only through the `cdlm.plugins` entry points: a throwaway plugin trains and samples via the CLI."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cdlm
from cdlm.errors import PluginError
from cdlm.registry import get_method, installed_methods
from toy_plugin.register import TOY_ROOT, register_toy

REPO = Path(__file__).resolve().parents[1]
TOY_RECIPE = """\
method: toy
description: throwaway plugin
model: {vocab_size: 300}
data: {source: builtin:pydoc, vocab_size: 300, seq_len: 16, max_rows: 40}
train: {steps: 3, batch_size: 4, optimizer: adamw, lr: 1.0e-3, log_every: 1, save_every: 3}
sample: {num_samples: 2, steps: 3, sampler: euler}
"""


def test_core_never_imports_a_plugin() -> None:
    for path in (REPO / "cdlm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] in {"cdlm_elf", "cdlm_cola"}], f"{path} imports a plugin"


def test_shipped_plugins_are_registered() -> None:
    assert "elf" in installed_methods()
    assert get_method("elf").name == "elf"


def test_unknown_method_error_lists_installed() -> None:
    with pytest.raises(PluginError, match="method 'nope' is not installed; installed: .*'elf'"):
        get_method("nope")


def test_throwaway_plugin_through_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_toy(tmp_path, monkeypatch)
    assert "toy" in installed_methods()
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(TOY_RECIPE)
    result = cdlm.train(cdlm.load_recipe(str(recipe)), tmp_path / "run")
    assert result.step == 3
    assert len(cdlm.sample(tmp_path / "run")) == 2


@pytest.mark.slow
def test_throwaway_plugin_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_toy(tmp_path, monkeypatch)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(TOY_RECIPE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "toy-site"), str(TOY_ROOT)]),
        "HF_HUB_OFFLINE": "1",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cdlm.cli", *args], capture_output=True, text=True, env=env)

    trained = cli("train", "--recipe", str(recipe), "-o", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "s.jsonl"
    sampled = cli("sample", "-c", str(tmp_path / "run"), "-o", str(out))
    assert sampled.returncode == 0, sampled.stderr
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 2
