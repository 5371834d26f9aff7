"""What only a GPU can tell: cdlm on CUDA against the CPU, bf16 against fp32, and the paper-size recipes' speed.

    python benchmarks/gpu.py --json gpu.json                      # on a CUDA machine (about 5 minutes on an H200)
    python benchmarks/gpu.py --device cpu --quick                 # the same code path on a CPU, tiny shapes

1. **Device parity.** Each tiny recipe (``elf-tiny``'s flow stage, ``cola-tiny``'s joint stage, ``ar-tiny``) is
   built from its seed twice, one copy on the CPU and one on ``--device``. The same objective call (same batch,
   same CPU generator, modules in eval mode) and the same generation run on both: fp32 with TF32 off, then on the
   device under bf16 autocast (``train.precision: auto``). Reported: the losses' relative difference and the share
   of generated tokens equal to the CPU's. Cola draws its per-sample noise from a generator on the model's device
   (the reference's way, spec §11.1), so its tokens are not expected to equal the CPU's.
2. **Training at paper size.** :class:`cdlm.training.Trainer` steps ``elf-105m`` (a random encoder of t5-small's
   shape: no hub here) and ``cola-2b`` (joint stage) on random token rows at the recipe's micro-batch and length,
   one micro-batch per step (``train.grad_accum=1``), precision ``auto`` (bf16 autocast on CUDA). Step time is
   wall-clock between synchronisations, best and median of ``--repeats`` after two warm-up steps; tokens/s counts
   token slots. Model FLOPs are counted, not modelled: ``torch.utils.flop_counter`` over one objective forward and
   backward (matmuls and attention; the optimizer's Newton–Schulz iterations are not model FLOPs). MFU is against
   the datasheet's dense bf16 rate (989 TFLOP/s for H100/H200 SXM) and against an 8192³ bf16 matmul measured in
   the same run. Peak memory is ``torch.cuda.max_memory_allocated`` over the steps.
3. **Sampling at paper size.** ``elf-105m`` with its headline sampler (32-step SDE, SC-CFG 3) on 64 rows × 1024;
   ``cola-2b`` with the benchmark protocol (16 Euler steps per block, CFG 7, greedy, penalty 1.1), 20 prompts of
   48 tokens, 32 new tokens each. Best and median of ``--repeats`` runs after one warm-up.

Everything is printed as Markdown tables as it is measured; ``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from importlib.metadata import version
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import cdlm
from cdlm.interfaces import GenerateRequest, Method, TokenBatch
from cdlm.precision import autocast_context
from cdlm.training import Trainer

DATASHEET_BF16 = 989e12  # H100 / H200 SXM dense bf16, FLOP/s
PARITY = {  # recipe → overrides selecting one stage (built from the recipe's seed; nothing is trained)
    "elf-tiny": ["stages=[]"],
    "cola-tiny": ["stages=[]", "model.stage=joint"],
    "ar-tiny": [],
}
OFFLINE = {"elf-105m": ["model.encoder.pretrained=null"], "cola-2b": []}
QUICK = {  # --quick: the paper recipes at CPU size, to run this file's code paths anywhere
    "elf-105m": ["model.depth=1", "model.hidden_size=64", "model.num_heads=2", "data.seq_len=64",
                 "model.max_length=64", "train.batch_size=2", "model.bottleneck_dim=16"],
    "cola-2b": ["model.dit.num_layers=1", "model.dit.txt_dim=64", "model.dit.emb_dim=64", "model.dit.heads=2",
                "model.dit.head_dim=32", "model.dit.rope_dim=12", "model.vae.dim=64", "model.vae.ffn_dim=128",
                "model.vae.num_heads=2", "model.vae.encoder_num_blocks=1", "model.vae.decoder_num_blocks=1",
                "model.vae.vocab_size=512", "model.pad_id=3", "model.eos_id=0", "model.im_end_id=null",
                "data.seq_len=64", "train.batch_size=2"],
}  # fmt: skip


def guarded(names: Iterable[str], measure: Callable[[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Measure each recipe in turn; a failure (say, out of memory) is printed and recorded, and the next runs."""
    rows = []
    for name in names:
        try:
            rows += measure(name)
        except Exception as error:  # noqa: BLE001 - a benchmark reports every failure and carries on
            rows.append({"recipe": name, "error": f"{type(error).__name__}: {error}"[:500]})
            print(f"| {name} | failed: {rows[-1]['error']} |", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def random_rows(rows: int, length: int, low: int, high: int, seed: int = 0) -> TokenBatch:
    """``rows`` × ``length`` token ids drawn uniformly from [low, high), all valid, none a condition."""
    ids = torch.randint(low, high, (rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(rows, length, dtype=torch.bool)
    return TokenBatch(ids, mask, torch.zeros_like(mask))


def vocab_size(config: cdlm.config.RunConfig) -> int:
    model = config.model
    return getattr(model, "vocab_size", None) or model.vae.vocab_size


def first_id(config: cdlm.config.RunConfig) -> int:
    """The lowest id that is no special token of the method (pad / eos / chat markers are below it)."""
    model = config.model
    specials = [getattr(model, key, None) for key in ("pad_id", "eos_id", "im_end_id")]
    return max([3, *[s + 1 for s in specials if isinstance(s, int) and s < 64]])


# 1. Device parity ---------------------------------------------------------------------------------------------


def generate(method: Method, config: cdlm.config.RunConfig, device: torch.device, precision: str) -> list[list[int]]:
    settings = config.sample
    prompts = None
    if config.method == "cola":  # Cola continues prompts
        gen = torch.Generator().manual_seed(5)
        prompts = [torch.randint(first_id(config), vocab_size(config), (6,), generator=gen).tolist()] * 4
    request = GenerateRequest(4, prompts, settings)
    with torch.no_grad(), autocast_context(device, precision):  # type: ignore[arg-type]
        return method.pipeline(request, torch.Generator().manual_seed(0), None).ids


def loss_of(method: Method, batch: TokenBatch, device: torch.device, precision: str) -> float:
    with torch.no_grad(), autocast_context(device, precision):  # type: ignore[arg-type]
        return method.objective(batch.to(device), torch.Generator().manual_seed(1)).loss.item()


def parity_rows(device: torch.device) -> list[dict[str, Any]]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return guarded(PARITY, lambda name: parity_of(name, device))


def parity_of(name: str, device: torch.device) -> list[dict[str, Any]]:
    """fp32 and bf16 on ``device`` against fp32 on the CPU: one objective call and one generation."""
    config = cdlm.load_recipe(name, PARITY[name])
    batch = random_rows(8, config.data.seq_len, first_id(config), vocab_size(config))
    cpu = torch.device("cpu")
    on_cpu, on_device = cdlm.build(config), cdlm.build(config)
    on_cpu.modules().eval()
    on_device.modules().to(device).eval()
    ref_loss = loss_of(on_cpu, batch, cpu, "fp32")
    ref_ids = generate(on_cpu, config, cpu, "fp32")
    rows = []
    for precision in ("fp32", "bf16"):
        loss = loss_of(on_device, batch, device, precision)
        ids = generate(on_device, config, device, precision)
        equal = sum(a == b for x, y in zip(ids, ref_ids, strict=True) for a, b in zip(x, y, strict=False))
        total = sum(len(x) for x in ref_ids)
        rows.append({
            "recipe": name, "precision": precision, "loss_cpu": ref_loss, "loss": loss,
            "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss), "tokens_equal": equal / max(total, 1),
        })  # fmt: skip
        r = rows[-1]
        print(f"| {name} | {precision} | {ref_loss:.6f} | {loss:.6f} | {r['loss_rel_diff']:.1e} "
              f"| {r['tokens_equal']:.3f} |", flush=True)  # fmt: skip
    return rows


# 2. Training at paper size --------------------------------------------------------------------------------------


def matmul_rate(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 matmul FLOP/s on ``device`` (mean of 10 after 3 warm-ups); 0 on a CPU."""
    if device.type != "cuda":
        return 0.0
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(10)], device) / 10
    return 2 * n**3 / seconds


def model_flops(method: Method, batch: TokenBatch, device: torch.device) -> int:
    """FLOPs of one objective forward + backward on ``batch`` (bf16 autocast on CUDA), counted by torch."""
    with FlopCounterMode(display=False) as counter, autocast_context(device, "auto"):
        method.objective(batch.to(device), torch.Generator().manual_seed(0)).loss.backward()
    method.modules().zero_grad(set_to_none=True)
    return counter.get_total_flops()


def train_of(name: str, device: torch.device, repeats: int, quick: bool, peak: float) -> list[dict[str, Any]]:
    """Trainer steps of recipe ``name`` on random rows: step time, tokens/s, MFU, peak memory."""
    overrides = [*OFFLINE[name], "train.grad_accum=1", "train.log_every=1000000", *(QUICK[name] if quick else [])]
    config = cdlm.load_recipe(name, overrides)
    seq, bs = config.data.seq_len, config.train.batch_size
    data = random_rows(2 * bs, seq, first_id(config), vocab_size(config))
    start = time.perf_counter()
    method = cdlm.build(config)
    build_s = time.perf_counter() - start
    method.modules().to(device)
    for module in method.frozen.values():
        module.eval().requires_grad_(False)
    flops = model_flops(method, TokenBatch(data.ids[:bs], data.mask[:bs], data.cond_mask[:bs]), device)
    params = sum(p.numel() for m in method.trainable.values() for p in m.parameters())
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, method, data, run_dir=run_dir)
        losses = [trainer.step().metrics()["loss"] for _ in range(2)]  # warm-up (allocator, kernels)
        times = [timed(lambda: losses.append(trainer.step().metrics()["loss"]), device) for _ in range(repeats)]
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    best, median = min(times), statistics.median(times)
    row = {
        "recipe": name, "batch": f"{bs} × {seq}", "trainable_params": params, "build_s": build_s,
        "step_best_s": best, "step_median_s": median, "tokens_per_s": bs * seq / median,
        "model_flops_per_step": flops, "mfu_datasheet": flops / median / DATASHEET_BF16,
        "mfu_measured_matmul": flops / median / peak if peak else float("nan"), "peak_memory_gb": peak_gb,
        "losses": losses, "optimizer": config.train.optimizer,
    }  # fmt: skip
    print(f"| {name} | {row['batch']} | {params / 1e6:.1f} M | {config.train.optimizer} | {best * 1e3:.0f} "
          f"| {median * 1e3:.0f} | {row['tokens_per_s']:,.0f} | {flops / 1e12:.1f} | {row['mfu_datasheet']:.1%} "
          f"| {row['mfu_measured_matmul']:.1%} | {peak_gb:.1f} | {losses[0]:.3f} → {losses[-1]:.3f} |",
          flush=True)  # fmt: skip
    return [row]


# 3. Sampling at paper size --------------------------------------------------------------------------------------

SAMPLING = {  # recipe → (sample overrides, prompt length (None: unconditional), rows)
    "elf-105m": (["sample.num_samples=64", "sample.batch_size=64"], None, 64),
    "cola-2b": (["sample.batch_size=20", "sample.max_new_tokens=32"], 48, 20),
}


def sample_of(name: str, device: torch.device, repeats: int, quick: bool) -> list[dict[str, Any]]:
    """Generation time of recipe ``name`` with its own sampler settings, in generated tokens per second."""
    sample_overrides, prompt_len, n = SAMPLING[name]
    if quick:
        n = 4
        sample_overrides = [s.replace("=64", "=4").replace("=20", "=4") for s in sample_overrides]
    config = cdlm.load_recipe(name, [*OFFLINE[name], *(QUICK[name] if quick else []), *sample_overrides])
    method = cdlm.build(config)
    method.modules().to(device).eval()
    prompts = None
    if prompt_len:
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(first_id(config), vocab_size(config), (prompt_len,), generator=gen).tolist()
                   for _ in range(n)]  # fmt: skip
    request = GenerateRequest(n, prompts, config.sample)
    out: list[Any] = []

    def run() -> None:
        with torch.no_grad(), autocast_context(device, config.train.precision):
            out.append(method.pipeline(request, torch.Generator().manual_seed(0), None))

    run()  # warm-up
    times = [timed(run, device) for _ in range(repeats)]
    new_tokens = sum(len(ids) for ids in out[-1].ids)  # generated ids only (prompts are not repeated)
    best, median = min(times), statistics.median(times)
    settings = config.sample
    row = {
        "recipe": name, "rows": n, "new_tokens": new_tokens, "steps": settings.steps, "sampler": settings.sampler,
        "nfe_per_row": out[-1].nfe, "best_s": best, "median_s": median, "tokens_per_s": new_tokens / median,
    }  # fmt: skip
    print(f"| {name} | {n} | {new_tokens} | {settings.sampler} {settings.steps} | {out[-1].nfe} "
          f"| {best:.2f} | {median:.2f} | {row['tokens_per_s']:,.0f} |", flush=True)  # fmt: skip
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the paper recipes at CPU size (a smoke run)")
    parser.add_argument("--only", nargs="*", default=["parity", "train", "sample"])
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# cdlm on {name}: torch {torch.__version__}, cdlm {version('cdlm')}\n", flush=True)
    result: dict[str, Any] = {"device": name, "torch": torch.__version__}
    if "parity" in args.only:
        print("| recipe | precision | loss (CPU fp32) | loss | relative diff | tokens equal to CPU |")
        print("|---|---|---|---|---|---|", flush=True)
        result["parity"] = parity_rows(device)
    if "train" in args.only:
        peak = matmul_rate(device)
        result["matmul_bf16_flops"] = peak
        print(f"\nmeasured bf16 matmul (8192³): {peak / 1e12:.0f} TFLOP/s\n")
        print("| recipe | micro-batch | trainable | optimizer | step best ms | step median ms | tokens/s "
              "| model TFLOP / step | MFU (989 TF) | MFU (measured matmul) | peak GB | loss |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        result["train"] = guarded(OFFLINE, lambda n: train_of(n, device, args.repeats, args.quick, peak))
    if "sample" in args.only:
        print("\n| recipe | rows | new tokens | sampler, steps | NFE per row | best s | median s | tokens/s |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
        result["sample"] = guarded(SAMPLING, lambda n: sample_of(n, device, args.repeats, args.quick))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
