"""Does data preparation stay flat in memory as the corpus grows, and is a warm start fast?

Builds synthetic corpora (Jane Austen's paragraphs from ``../shared/data/austen``, reshuffled with a fixed seed
and repeated to the size asked for), then, for each size, in fresh processes:

1. **cold**: an empty row cache and datasets cache; ``prepare`` cuts the text into chunks of whole paragraphs
   and tokenises and packs them (``data.num_proc`` processes, each reading its chunks in place) into the row
   cache. Wall time and peak RSS (the main process, and the largest worker) are measured.
2. **warm**: ``cdlm.train`` of the elf-tiny recipe on that corpus for 2 steps, reusing the cache. Time from
   launching the process to the end of the first training step, and peak RSS of the whole process.

The cold time to the first step is the cold preparation plus the warm run's time from launch to the first
step minus its (warm) preparation. The BPE (512 tokens, elf-tiny's) is trained once on the original books and
placed in every run directory, so no run trains a tokenizer. Prints a table; ``--json`` writes the figures.

    python benchmarks/data_scale.py --sizes-mb 100 1024 --num-proc 2 --work /tmp/cdlm-data-scale
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "austen"
SEED = 0


def austen_paragraphs() -> list[str]:
    """Every non-empty paragraph of the six novels, in book order."""
    out: list[str] = []
    for path in sorted(AUSTEN.glob("*.txt.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            out += [p.strip() for p in re.split(r"\n\s*\n", f.read()) if p.strip()]
    return out


def write_corpus(path: Path, size: int, paragraphs: list[str]) -> None:
    """Write at least ``size`` bytes of paragraphs, each pass over the books in a new seeded order."""
    rng = np.random.default_rng(SEED)
    written = 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        while written < size:
            for i in rng.permutation(len(paragraphs)):
                written += f.write(paragraphs[i] + "\n\n")
                if written >= size:
                    break
    os.replace(tmp, path)


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident set (VmHWM) of this process and of its largest finished child, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, child


class AnonSampler:
    """Samples, every 50 ms, the anonymous (heap) RSS of this process and of each descendant, keeping the peaks.

    VmHWM also counts the file pages of memory-mapped Arrow tables that a process has read: page cache, shared
    and reclaimable, which grows with how much of the corpus a process touched. RssAnon is what it allocated.
    """

    def __init__(self) -> None:
        self.own = self.worker = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.own = max(self.own, _anon_mb(os.getpid()))
            for pid in _descendants(os.getpid()):
                self.worker = max(self.worker, _anon_mb(pid))

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.own, self.worker


def _anon_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"^RssAnon:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) / 1024 if found else 0.0


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *_descendants(kid)]
    return out


def overrides(corpus: Path, cache: Path, num_proc: int) -> list[str]:
    return [f"data.source={corpus}", f"data.cache_dir={cache}", f"data.num_proc={num_proc}"]


def child_prepare(corpus: Path, cache: Path, run_dir: Path, num_proc: int) -> dict[str, float]:
    """Cold preparation in this (fresh) process."""
    from cdlm import load_recipe
    from cdlm.data.pack import prepare

    config = load_recipe("elf-tiny", overrides(corpus, cache, num_proc))
    sampler = AnonSampler()
    start = time.perf_counter()
    data = prepare(config.data, run_dir)
    seconds = time.perf_counter() - start
    own, child = peak_rss_mb()
    anon, anon_worker = sampler.stop()
    return {
        "prepare_s": seconds,
        "rows": len(data.rows),
        "rss_mb": own,
        "worker_rss_mb": child,
        "anon_mb": anon,
        "worker_anon_mb": anon_worker,
    }


def child_train(corpus: Path, cache: Path, run_dir: Path, num_proc: int, launched: float) -> dict[str, float]:
    """A warm 2-step training run in this (fresh) process; times are from ``launched`` (the parent's clock)."""
    from cdlm import load_recipe
    from cdlm.api import train

    config = load_recipe(
        "elf-tiny", [*overrides(corpus, cache, num_proc), "train.steps=2", "train.log_every=1", "train.save_every=2"]
    )
    marks: dict[str, float] = {}

    def on_status(message: str) -> None:
        if message.startswith("data: ") and "rows of" in message:
            marks["prepared_s"] = time.time() - launched

    def on_log(record: dict[str, float]) -> None:
        marks.setdefault("first_step_s", time.time() - launched)

    sampler = AnonSampler()
    prep_start = time.time() - launched
    train(config, run_dir, on_log=on_log, on_status=on_status)
    own, _ = peak_rss_mb()
    anon, _ = sampler.stop()
    return {**marks, "warm_prepare_s": marks["prepared_s"] - prep_start, "rss_mb": own, "anon_mb": anon}


def run_child(kind: str, *args: str) -> dict[str, float]:
    launched = time.time()
    cmd = [sys.executable, __file__, "--child", kind, *args, "--launched", str(launched)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(size_mb: int, work: Path, num_proc: int, paragraphs: list[str]) -> dict[str, float]:
    corpus = work / f"austen-{size_mb}MB.txt"
    if not corpus.is_file():
        write_corpus(corpus, size_mb * 2**20, paragraphs)
    cache, hf = work / f"rows-{size_mb}", work / f"hf-{size_mb}"
    for stale in (cache, hf, work / f"run-prep-{size_mb}", work / f"run-train-{size_mb}"):
        shutil.rmtree(stale, ignore_errors=True)
    for run in (work / f"run-prep-{size_mb}", work / f"run-train-{size_mb}"):
        run.mkdir(parents=True)
        shutil.copy(work / "tokenizer.json", run / "tokenizer.json")
    os.environ["HF_DATASETS_CACHE"] = str(hf)
    common = [str(corpus), str(cache), str(num_proc)]
    cold = run_child("prepare", *common, str(work / f"run-prep-{size_mb}"))
    warm = run_child("train", *common, str(work / f"run-train-{size_mb}"))
    return {
        "size_mb": corpus.stat().st_size / 2**20,
        "rows": cold["rows"],
        "cold_prepare_s": cold["prepare_s"],
        "cold_first_step_s": cold["prepare_s"] + warm["first_step_s"] - warm["warm_prepare_s"],
        "warm_first_step_s": warm["first_step_s"],
        "warm_prepare_s": warm["warm_prepare_s"],
        "prepare_rss_mb": cold["rss_mb"],
        "prepare_worker_rss_mb": cold["worker_rss_mb"],
        "prepare_anon_mb": cold["anon_mb"],
        "prepare_worker_anon_mb": cold["worker_anon_mb"],
        "train_rss_mb": warm["rss_mb"],
        "train_anon_mb": warm["anon_mb"],
    }


def table(results: list[dict[str, float]]) -> str:
    head = (
        "| corpus | rows of 64 | cold prepare s | cold → first step s | warm → first step s (data s) "
        "| prepare peak RSS MiB, main / worker: VmHWM (anon) | training peak RSS MiB: VmHWM (anon) |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['size_mb']:.0f} MiB | {r['rows']:,} | {r['cold_prepare_s']:.1f} | {r['cold_first_step_s']:.1f} "
        f"| {r['warm_first_step_s']:.1f} ({r['warm_prepare_s']:.2f}) | {r['prepare_rss_mb']:.0f} "
        f"({r['prepare_anon_mb']:.0f}) / {r['prepare_worker_rss_mb']:.0f} ({r['prepare_worker_anon_mb']:.0f}) "
        f"| {r['train_rss_mb']:.0f} ({r['train_anon_mb']:.0f}) |"
        for r in results
    ]
    if len(results) >= 2:
        a, b = results[0], results[-1]

        def ratio(key: str) -> str:
            return f"{b[key] / a[key]:.2f}×"

        lines.append(
            f"\nLargest / smallest: corpus {b['size_mb'] / a['size_mb']:.1f}×; prepare peak RSS main "
            f"{ratio('prepare_rss_mb')} (anon {ratio('prepare_anon_mb')}), worker {ratio('prepare_worker_rss_mb')} "
            f"(anon {ratio('prepare_worker_anon_mb')}); training peak RSS {ratio('train_rss_mb')} "
            f"(anon {ratio('train_anon_mb')}); target ≤ 1.2×. Warm start "
            f"{max(r['warm_first_step_s'] for r in results):.1f} s at most (target < 10 s)."
        )
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cdlm-data-scale"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=["prepare", "train"], default=None)
    parser.add_argument("--launched", type=float, default=0.0)
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if ns.child is not None:
        corpus, cache, num_proc, run_dir = ns.args
        fn = child_prepare if ns.child == "prepare" else child_train
        extra = () if ns.child == "prepare" else (ns.launched,)
        print(json.dumps(fn(Path(corpus), Path(cache), Path(run_dir), int(num_proc), *extra)))
        return
    ns.work.mkdir(parents=True, exist_ok=True)
    paragraphs = austen_paragraphs()
    if not (ns.work / "tokenizer.json").is_file():
        from cdlm.data.tokenize import train_bpe

        train_bpe(paragraphs, 512).save(str(ns.work / "tokenizer.json"))
    results = []
    for size in ns.sizes_mb:
        results.append(measure(size, ns.work, ns.num_proc, paragraphs))
        print(json.dumps(results[-1]), flush=True)
    if ns.json is not None:
        ns.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()
