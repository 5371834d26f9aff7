"""Register the toy method as an installed plugin for one test: a dist-info with an entry point on sys.path."""

from __future__ import annotations

from pathlib import Path

import pytest

TOY_ROOT = Path(__file__).resolve().parent  # holds the importable package cdlm_toy

METADATA = "Metadata-Version: 2.1\nName: toy\nVersion: 0.0\n"
ENTRY_POINTS = "[cdlm.plugins]\ntoy = cdlm_toy:spec\n"


def register_toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``cdlm_toy`` importable and discoverable as method ``toy`` (group ``cdlm.plugins``) for this test."""
    site = tmp_path / "toy-site"
    dist = site / "toy-0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(METADATA, encoding="utf-8")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(TOY_ROOT))
    monkeypatch.syspath_prepend(str(site))
