"""Every speed figure of issue 9 in one command: cdlm against the reference's way, timed in the same process.

    python benchmarks/run.py                          # table on stdout, JSON in benchmarks/results.json
    python benchmarks/run.py --repeats 9 --json /tmp/results.json

ELF (width 256, depth 4, 4 heads, L 128, B 8, V 32100, random T5-small-shaped encoder) is timed against
benchmarks/elf_reference.py, the reference implementation's way on the same modules and weights. Cola (the
spec §16 tiny configuration) is timed against ``ColaPipeline`` run the reference's way (two CFG passes,
per-call masks/RoPE/AdaLN; benchmarks/cola_reference.py). Each pair runs alternately, ``--repeats`` times after
one warm-up each, on one thread, in process CPU time; a ratio is baseline ÷ cdlm for the best (min) and the
median run. The outputs are checked equal first (token ids; losses within 1e-6 relative).

Scaling rows: the cdlm ELF training step at L 128 / 256 / 512, each in a fresh process for its peak RSS,
Cola per-block time at batch 1 / 4 / 16, and the Cola 2L training step at batch 4 / 16 / 64 (equal-length
samples as one batched call against NA calls of 4 samples; benchmarks/cola_training.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from cola_generation import build as build_cola
from cola_generation import make_request
from cola_generation import pipeline as cola_pipeline
from cola_training import steps as cola_train_steps
from elf_reference import ReferenceNetwork, eager_embedder, reference_greedy

from cdlm.config import TrainConfig
from cdlm.interfaces import TokenBatch
from cdlm.pipeline import rollout
from cdlm.training.ema import EMA
from cdlm.training.optim import Muon, build_optimizer
from cdlm_elf.conditioning import ElfCond
from cdlm_elf.config import ElfConfig, ElfSampleConfig, EncoderConfig
from cdlm_elf.embedder import T5Embedder
from cdlm_elf.model import ElfDecoder, ElfDenoiser, ElfTransformer
from cdlm_elf.objective import ElfObjective
from cdlm_elf.pipeline import decode, elf_denoise_fn, guided
from cdlm_elf.schedule import ElfSchedule

TARGETS = {"elf train step": 1.6, "elf sde / nfe": 1.2, "elf ode+cfg / step": 1.3, "elf final decode": 1.5,
           "cola / block, batch 4": 3.5, "cola / block, batch 16": 2.0}  # fmt: skip
BATCH, STEPS = 8, 8


def alternate(pair: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each callable once to warm up, then ``repeats`` times alternately; each returns its seconds."""
    for fn in pair.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in pair}
    for _ in range(repeats):
        for name, fn in pair.items():
            times[name].append(fn())
    return times


def timed(fn: Callable[[], object], per: float = 1.0) -> Callable[[], float]:
    """Wrap ``fn`` to return its process CPU seconds divided by ``per``."""

    def run() -> float:
        start = time.process_time()
        fn()
        return (time.process_time() - start) / per

    return run


def elf_config(length: int) -> ElfConfig:
    return ElfConfig(max_length=length, hidden_size=256, depth=4, num_heads=4, encoder=EncoderConfig(pretrained=None))


def elf_train(length: int) -> tuple[Callable[[str], float], Callable[[str], float]]:
    """Build ELF at sequence ``length``; return (loss of a path, one timed training step of a path)."""
    cfg = elf_config(length)
    embedder, net = T5Embedder(cfg), ElfTransformer(cfg, torch.Generator().manual_seed(0))
    schedule = ElfSchedule(cfg)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (BATCH, length), generator=gen)
    cond = torch.zeros(BATCH, length, dtype=torch.bool)
    cond[: BATCH // 2, : length // 4] = True  # half the rows seq2seq
    batch = TokenBatch(ids, torch.ones_like(cond), cond)
    train = TrainConfig(optimizer="muon", lr=1e-4)
    params = [p for p in net.parameters() if p.requires_grad]
    paths = {
        "cdlm": (ElfObjective(cfg, embedder, net, schedule), build_optimizer(net.named_parameters(), train)),
        "reference": (
            ElfObjective(cfg, eager_embedder(embedder), ReferenceNetwork(net), schedule),  # type: ignore[arg-type]
            Muon([p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2], lr=1e-4, ns_side="direct"),
        ),
    }
    ema = EMA(net, 0.9999)

    def loss(path: str) -> float:
        with torch.no_grad():
            return paths[path][0](batch, torch.Generator().manual_seed(1)).loss.item()

    def step(path: str) -> float:
        objective, optimizer = paths[path]
        start = time.process_time()
        objective(batch, torch.Generator().manual_seed(1)).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(net)
        return time.process_time() - start

    return loss, step


def elf_rows(repeats: int) -> list[dict]:
    """The four ELF rows (training step, SDE per NFE, ODE + CFG per step, final decode)."""
    loss, step = elf_train(128)
    ours, ref = loss("cdlm"), loss("reference")
    assert abs(ours - ref) <= 1e-6 * abs(ref), f"ELF loss differs: {ours} vs {ref}"
    rows = [row("elf train step", alternate({p: lambda p=p: step(p) for p in ("reference", "cdlm")}, repeats))]

    cfg = elf_config(128)
    net = ElfTransformer(cfg, torch.Generator().manual_seed(0))
    torch.nn.init.normal_(net.flow_head.linear.weight, std=0.02, generator=torch.Generator().manual_seed(2))
    schedule, nets = ElfSchedule(cfg), {"cdlm": net, "reference": ReferenceNetwork(net)}
    gen = torch.Generator().manual_seed(3)
    z0 = 2.0 * torch.randn(BATCH, 128, cfg.latent_dim, generator=gen)
    w = torch.full((BATCH,), 3.0)
    is_source = torch.arange(128)[None] < torch.randint(8, 64, (BATCH, 1), generator=gen)
    seq2seq = ElfCond(w, torch.randn(BATCH, 128, cfg.latent_dim, generator=gen), is_source)
    sde = ElfSampleConfig(steps=STEPS, sampler="sde", grid="uniform")
    ode = ElfSampleConfig(steps=STEPS, sampler="euler", grid="uniform", guidance=2.0)

    def sample(path: str, cond: ElfCond, settings: ElfSampleConfig) -> torch.Tensor:
        denoise = elf_denoise_fn(ElfDenoiser(nets[path]), schedule)  # type: ignore[arg-type]
        noise = torch.Generator().manual_seed(4)
        return rollout(guided(denoise, cond, settings.guidance), z0, torch.linspace(0, 1, STEPS + 1), settings,
                       noise_scale=2.0, generator=noise, constrain=cond.restore).z  # fmt: skip

    with torch.no_grad():
        for name, cond, settings in (("elf sde / nfe", ElfCond(w), sde), ("elf ode+cfg / step", seq2seq, ode)):
            err = (sample("cdlm", cond, settings) - sample("reference", cond, settings)).abs().max().item()
            assert err < 1e-4, f"{name}: latents differ by {err:.2e}"
            pair = {p: timed(lambda p=p, c=cond, s=settings: sample(p, c, s), STEPS) for p in ("reference", "cdlm")}
            rows.append(row(name, alternate(pair, repeats)))
        z = sample("cdlm", ElfCond(w), sde)
        decoders = {p: ElfDecoder(n) for p, n in nets.items()}  # type: ignore[arg-type]
        greedy = ElfSampleConfig(temperature=0.0)
        ids = decode(decoders["cdlm"], z, ElfCond(w), greedy, torch.Generator())
        assert torch.equal(ids, reference_greedy(decoders["reference"](z, ElfCond(w)))), "decode: ids differ"
        pair = {
            "reference": timed(lambda: reference_greedy(decoders["reference"](z, ElfCond(w)))),
            "cdlm": timed(lambda: decode(decoders["cdlm"], z, ElfCond(w), greedy, torch.Generator())),
        }
        rows.append(row("elf final decode", alternate(pair, repeats)))
    return rows


def cola_rows(repeats: int, batches: tuple[int, ...] = (1, 4, 16), blocks: int = 8, steps: int = 16) -> list[dict]:
    """Cola per generated block: reference-equivalent pipeline options against the fast path, per batch size."""
    vae, dit = build_cola("tiny", torch.device("cpu"))
    rows = []
    for batch in batches:
        request = make_request(batch, blocks, steps, dit.config.block_size)
        runs = {p: cola_pipeline(vae, dit, p) for p in ("reference", "fast")}
        outputs = {p: runs[p](request, torch.Generator().manual_seed(0)).ids for p in runs}
        assert outputs["fast"] == outputs["reference"], f"cola batch {batch}: token ids differ"
        pair = {p: timed(lambda r=runs[p], q=request: r(q, torch.Generator().manual_seed(0)), blocks) for p in runs}
        times = alternate(pair, repeats)
        rows.append(row(f"cola / block, batch {batch}", {"reference": times["reference"], "cdlm": times["fast"]}))
    return rows


def cola_train_rows(repeats: int, batches: tuple[int, ...] = (4, 16, 64)) -> list[dict]:
    """Cola 2L training step (forward, loss, backward): equal-length samples as one batch against NA groups of 4."""
    _, dit = build_cola("tiny", torch.device("cpu"))
    dit.train()
    return [row(f"cola train step, batch {b}", alternate(cola_train_steps(dit, b), repeats)) for b in batches]


def row(name: str, times: dict[str, list[float]]) -> dict:
    ref, ours = times["reference"], times["cdlm"]
    return {
        "task": name, "target": TARGETS.get(name),
        "reference_min_s": min(ref), "reference_median_s": statistics.median(ref),
        "cdlm_min_s": min(ours), "cdlm_median_s": statistics.median(ours),
        "ratio_min": min(ref) / min(ours), "ratio_median": statistics.median(ref) / statistics.median(ours),
        "repeats": len(ours),
    }  # fmt: skip


def _scaling_child(length: int, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    _, step = elf_train(length)
    seconds = min(step("cdlm") for _ in range(3))
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))  # Linux: KiB → MiB


def scaling_rows(lengths: tuple[int, ...] = (128, 256, 512)) -> list[dict]:
    """cdlm ELF training step time (best of 3) and peak RSS, one fresh process per sequence length."""
    ctx, rows = multiprocessing.get_context("spawn"), []
    for length in lengths:
        queue = ctx.Queue()
        child = ctx.Process(target=_scaling_child, args=(length, queue))
        child.start()
        seconds, rss = queue.get()
        child.join()
        rows.append({"task": f"elf train step, L {length}", "cdlm_min_s": seconds, "peak_rss_mib": rss})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = elf_rows(args.repeats) + cola_rows(args.repeats) + cola_train_rows(args.repeats)
    print(f"{'task':<26} {'reference ms':>13} {'cdlm ms':>9} {'× (min)':>8} {'× (median)':>11} {'target':>7}")
    for r in rows:
        target = f"≥{r['target']}" if r["target"] else ""
        print(f"{r['task']:<26} {r['reference_min_s'] * 1e3:>13.1f} {r['cdlm_min_s'] * 1e3:>9.1f} "
              f"{r['ratio_min']:>7.2f}× {r['ratio_median']:>10.2f}× {target:>7}")  # fmt: skip
    scaling = [] if args.skip_scaling else scaling_rows()
    for r in scaling:
        print(f"{r['task']:<26} {r['cdlm_min_s'] * 1e3:>9.1f} ms  peak RSS {r['peak_rss_mib']:.0f} MiB")
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "threads": 1, "repeats": args.repeats, "clock": "process CPU time"}  # fmt: skip
    args.json.write_text(json.dumps({"meta": meta, "rows": rows, "scaling": scaling}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
