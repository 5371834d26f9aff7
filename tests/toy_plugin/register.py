"""Install the example plugin ``examples/toy-plugin`` (method ``toy``) for one test, and make rows to train it on.

The plugin is registered as ``pip install`` would: a dist-info whose entry point (group ``cdlm.plugins``) is
the one its ``pyproject.toml`` declares, on ``sys.path`` next to the importable package ``cdlm_toy``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdlm.data.pack import pack_documents
from cdlm.data.tokenize import SpecialIds
from cdlm.interfaces import TokenBatch

TOY_ROOT = Path(__file__).resolve().parents[2] / "examples" / "toy-plugin"  # holds the importable package cdlm_toy
TESTS_ROOT = Path(__file__).resolve().parents[1]  # a child process imports this module from here

METADATA = "Metadata-Version: 2.1\nName: cdlm-toy\nVersion: 0.1.0\n"
ENTRY_POINT = "toy = cdlm_toy:spec"  # as [project.entry-points."cdlm.plugins"] in examples/toy-plugin/pyproject.toml


def register_toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``cdlm_toy`` importable and discoverable as method ``toy`` (group ``cdlm.plugins``) for this test."""
    site = tmp_path / "toy-site"
    dist = site / "cdlm_toy-0.1.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(METADATA, encoding="utf-8")
    (dist / "entry_points.txt").write_text(f"[cdlm.plugins]\n{ENTRY_POINT}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(TOY_ROOT))
    monkeypatch.syspath_prepend(str(site))


def random_rows(num_docs: int = 40, seed: int = 0, *, length: int = 16, vocab_size: int = 64) -> TokenBatch:
    """Packed rows of random documents (ids 3..V-1, EOS 1, pad 0); the defaults are ToyConfig's."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 2 * length, (num_docs,), generator=g).tolist()
    docs = [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]
    return pack_documents(docs, length, SpecialIds(pad=0, eos=1), "pad")
