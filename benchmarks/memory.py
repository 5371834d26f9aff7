"""Training memory per GPU of the large recipes, and the FSDP degree each needs on one 80 GB GPU.

    python benchmarks/memory.py                          # every large recipe, Markdown table on stdout
    python benchmarks/memory.py elf-105m cola-2b --gpu-gb 80

Weights, gradients, optimizer state and EMA are counted from the recipe's model built on the meta device
(nothing is allocated): cdlm keeps all of them fp32 in every precision mode (cdlm/precision.py), so only the
activations differ between the fp32 and bf16 columns. Optimizer state: AdamW 8 bytes per trainable parameter;
Muon 4 bytes (momentum) for 2-D weights and 8 (Adam) for the rest. Frozen modules (ELF's T5 encoder, Cola's
reference VAE) hold weights only.

Activations are measured, not modelled: the recipe's objective runs on the CPU at the recipe's sequence length,
batch 1 and 2, at depth 1 and 2 of each depth knob, under ``torch.autograd.graph.saved_tensors_hooks`` that add up
the bytes of every distinct non-parameter tensor saved for backward (fp32, and under bf16 autocast for the bf16
columns); the increments are extrapolated to the recipe's depth and to ``train.batch_size`` rows (one micro-batch;
accumulation does not add activations). Cola is measured at L 128 and scaled linearly to its L 512 (more would need
over 20 GB of host memory), so its activation figures are estimates. The CPU attention kernels save the L×L
attention matrices; GPU flash / memory-efficient kernels do not, so "bf16, flash" leaves them out, and the fit is
judged on it.

Fits: weights + gradients + optimizer + EMA + activations (bf16, flash) ≤ 90 % of the GPU (the rest for the allocator,
CUDA context and temporaries). FSDP degree: the smallest power of two N with (trainable weights + gradients +
optimizer + EMA) / N + frozen weights + activations ≤ that budget (FSDP shards the trainable networks and
their EMA; frozen modules stay whole on every GPU). That is for each block its own unit; the one unit of
``recipes/accelerate/fsdp.yaml`` also holds the trainable weights and gradients whole during a step. When the
activations alone do not fit: the largest ``train.batch_size`` that fits with DDP (raise ``train.grad_accum``
to keep the global batch).
"""

from __future__ import annotations

import argparse
import sys

import torch

import cdlm
from cdlm.interfaces import Method, TokenBatch

LARGE = ["elf-105m", "elf-342m", "elf-652m", "cola-2b"]
OFFLINE = {"elf": ["model.encoder.pretrained=null"]}  # a random T5-small-shaped encoder: same shapes, no hub
DEPTH_KNOBS = {  # groups of config paths scaled together when extrapolating activations per layer
    "elf": [["model.depth"]],
    "cola": [["model.dit.num_layers"], ["model.vae.encoder_num_blocks", "model.vae.decoder_num_blocks"]],
}
MEASURE_LEN = {"cola": 128}  # Cola is measured at L 128 and scaled (L 512 took over 20 GB of host memory)
GB = 1e9


def states(method: Method, optimizer: str) -> dict[str, float]:
    """Bytes of weights, gradients, optimizer state and EMA (all fp32) of a method built on the meta device."""
    trainable = [p for module in method.trainable.values() for p in module.parameters()]
    frozen = sum(p.numel() for module in method.frozen.values() for p in module.parameters())
    n = sum(p.numel() for p in trainable)
    if optimizer == "muon":
        opt = sum(p.numel() * (4 if p.ndim == 2 else 8) for p in trainable)
    else:
        opt = 8 * n
    return {"params": n, "frozen": frozen, "weights": 4 * (n + frozen), "grads": 4 * n, "optim": opt, "ema": 4 * n}


def saved_bytes(config: cdlm.config.RunConfig, precision: str, rows: int, length: int) -> torch.Tensor:
    """Bytes saved for backward by one objective call of ``rows`` × ``length`` tokens: (all, attention matrices).

    Distinct storages are counted once; parameters are left out (they are counted as weights). An attention
    matrix is a saved tensor whose last two dimensions are equal and at least 256 (scores or probabilities).
    """
    torch.manual_seed(0)
    method = cdlm.build(config)
    for module in method.frozen.values():
        module.eval().requires_grad_(False)
    params = {p.untyped_storage().data_ptr() for p in method.modules().parameters()}
    vocab = getattr(config.model, "vocab_size", None) or config.model.vae.vocab_size
    ids = torch.randint(3, vocab - 1, (rows, length))
    batch = TokenBatch(ids, torch.ones(rows, length, dtype=torch.bool), torch.zeros(rows, length, dtype=torch.bool))
    seen: dict[tuple[int, int], tuple[int, bool]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            square = t.dim() >= 2 and t.shape[-1] == t.shape[-2] >= 256
            seen[(storage.data_ptr(), storage.nbytes())] = (storage.nbytes(), square)
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        method.objective(batch, torch.Generator().manual_seed(0))
    return torch.tensor(
        [sum(n for n, _ in seen.values()), sum(n for n, square in seen.values() if square)], dtype=torch.float64
    )


def activations(name: str, config: cdlm.config.RunConfig, precision: str) -> torch.Tensor:
    """Activation bytes (all, attention matrices) of one micro-batch of ``train.batch_size`` rows.

    Per-row bytes come from 2 rows minus 1 row (what does not grow with the batch, e.g. autocast's weight
    copies, is counted once); each depth knob's per-layer bytes from depth 2 minus depth 1.
    """
    offline = OFFLINE.get(config.method, [])
    knobs = DEPTH_KNOBS[config.method]
    ones = [f"{path}=1" for group in knobs for path in group]

    length = MEASURE_LEN.get(config.method, config.data.seq_len)
    scale = config.data.seq_len / length  # linear in length (exact when measured at the recipe's length)

    def measure(overrides: list[str]) -> torch.Tensor:  # fixed + batch_size · per-row, at these depths
        recipe = cdlm.load_recipe(name, offline + overrides + [f"data.seq_len={length}"])
        one, two = (saved_bytes(recipe, precision, r, length) for r in (1, 2))
        return (2 * one - two) + scale * config.train.batch_size * (two - one)

    base = measure(ones)
    total = base.clone()
    for group in knobs:
        bumped = measure(ones + [f"{path}=2" for path in group])
        total += (_get(config, group[0]) - 1) * (bumped - base)
    return total


def _get(config: object, path: str) -> int:
    for part in path.split(".")[:]:
        config = getattr(config, part)
    return int(config)  # type: ignore[arg-type]


def fits(s: dict[str, float], acts: float, per_row: float, budget: float) -> str:
    """DDP when it fits; else the smallest power-of-two FSDP degree that does; else the batch that would fit."""
    whole = 4 * s["frozen"]  # frozen weights: on every GPU, sharded or not
    sharded = s["weights"] - whole + s["grads"] + s["optim"] + s["ema"]
    if sharded + whole + acts <= budget:
        return "yes (DDP)"
    if whole + acts < budget:
        n = 1
        while sharded / n + whole + acts > budget:
            n *= 2
        return f"FSDP ≥ {n}"
    return f"no: activations; DDP fits batch ≤ {int((budget - sharded - whole) // per_row)}"


def main(argv: list[str] | None = None) -> None:
    """Print the memory table of the named recipes (default: every large recipe)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=LARGE)
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--states-only", action="store_true", help="skip the activation measurement (Cola: > 13 GB)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    budget = 0.9 * args.gpu_gb * GB
    print(
        "| recipe | trainable / frozen params | weights | grads | optimizer | EMA | act. fp32 | act. bf16 "
        f"| act. bf16, flash | total fp32 | total bf16, flash | one {args.gpu_gb:.0f} GB GPU (bf16, flash) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.recipes:
        config = cdlm.load_recipe(name, OFFLINE.get(cdlm.load_recipe(name).method, []))
        with torch.device("meta"):
            s = states(cdlm.build(config), config.train.optimizer)
        state = s["weights"] + s["grads"] + s["optim"] + s["ema"]
        if args.states_only:
            print(
                f"| {name} | {s['params']:,} / {s['frozen']:,} | {s['weights'] / GB:.2f} | {s['grads'] / GB:.2f} "
                f"| {s['optim'] / GB:.2f} | {s['ema'] / GB:.2f} | – | – | – | – | – "
                f"| {fits(s, 0.0, 1.0, budget)} without activations |"
            )
            continue
        fp32, bf16 = (activations(name, config, p) for p in ("fp32", "bf16"))
        flash = float(bf16[0] - bf16[1].clamp(min=0))  # GPU flash / memory-efficient attention keeps no L×L matrix
        per_row = flash / config.train.batch_size
        print(
            f"| {name} (batch {config.train.batch_size} × {config.data.seq_len}, {config.train.optimizer}) "
            f"| {s['params']:,} / {s['frozen']:,} | {s['weights'] / GB:.2f} | {s['grads'] / GB:.2f} "
            f"| {s['optim'] / GB:.2f} | {s['ema'] / GB:.2f} | {fp32[0] / GB:.1f} | {bf16[0] / GB:.1f} "
            f"| {flash / GB:.1f} | {(state + fp32[0]) / GB:.1f} | {(state + flash) / GB:.1f} "
            f"| {fits(s, flash, per_row, budget)} |",
            flush=True,
        )
    print(f"\nGB = 1e9 bytes; fits: ≤ 90 % of {args.gpu_gb:.0f} GB. {sys.argv[0]}", file=sys.stderr)


if __name__ == "__main__":
    main()
