"""The README is tested: every fenced bash/python block runs, offline, in order, in one temporary directory.

Blocks marked ``<!-- ci-runs-this -->`` (the install and the test command) are run by ``.ci/run`` itself; this
test checks that ``.ci/run`` contains them verbatim.
"""

from __future__ import annotations

import os
import re
import signal
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
    """Every block runs and prints; the main job (the first, minutes on one thread) runs beside the others.

    One core would idle while the main job trains, so it runs in the background from the start; the blocks that
    read its run directory wait for it, the rest run meanwhile, in order. Their row caches are safe to build at
    once (each is written to its own temporary directory and renamed into place).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    runnable = [(language, code) for ci_runs, language, code in blocks() if not ci_runs]
    (main_language, main_code), rest = runnable[0], runnable[1:]
    main_run = re.search(r"-o (\S+)", main_code)
    assert main_run, f"the main job names its run directory with -o:\n{main_code}"
    reads_main = re.compile(re.escape(main_run.group(1)) + r"(?![\w-])")  # not runs/elf-tiny-pd
    logs = tmp_path / "main-job.out", tmp_path / "main-job.err"  # files: a full pipe would stall the job
    with logs[0].open("w") as out, logs[1].open("w") as err:
        main_job = subprocess.Popen(
            command(main_language, main_code), cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            for language, code in rest:
                if not reads_main.search(code):
                    run_block(language, code, tmp_path, env)
            main_job.wait(timeout=1500)
        finally:
            if main_job.poll() is None:  # a block failed: stop the job and the cdlm processes it started
                os.killpg(main_job.pid, signal.SIGKILL)
    check_block(main_code, main_job.returncode, logs[0].read_text(), logs[1].read_text())
    for language, code in rest:
        if reads_main.search(code):
            run_block(language, code, tmp_path, env)


def command(language: str, code: str) -> list[str]:
    return ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]


def run_block(language: str, code: str, cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(command(language, code), cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    check_block(code, done.returncode, done.stdout, done.stderr)


def check_block(code: str, returncode: int, stdout: str, stderr: str) -> None:
    assert returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{stderr[-3000:]}"
    assert stdout.strip(), f"README block printed nothing:\n{code}"
