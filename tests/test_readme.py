"""The README is tested: every fenced bash/python block runs, offline, in order, in one temporary directory.

Blocks marked ``<!-- ci-runs-this -->`` (the install and the test command) are run by ``.ci/run`` itself; this
test checks that ``.ci/run`` contains them verbatim.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- ci-runs-this -->\n)?```(bash|python)\n(.*?)```", re.DOTALL)


def blocks() -> list[tuple[bool, str, str]]:
    return [(bool(m.group(1)), m.group(2), m.group(3)) for m in BLOCK.finditer((REPO / "README.md").read_text())]


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    marked = [code.strip() for ci_runs, _, code in blocks() if ci_runs]
    assert len(marked) == 2  # install, tests
    for code in marked:
        assert code in ci, f".ci/run does not run the README command {code!r}"


@pytest.mark.slow
def test_readme_blocks_run(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for ci_runs, language, code in blocks():
        if ci_runs:
            continue
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"README block printed nothing:\n{code}"
