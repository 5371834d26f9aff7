"""Cola generation: time per generated block of the reference's way against the fast path, and why.

Question: how much faster than the reference's way is the fast path, which runs the conditional and
unconditional CFG rows as ONE 2B-row DiT forward and plans each block's DiT calls once, and what does each of
the two give on its own? What does the KV cache save over recomputing the history at every call? Every path
must give the same tokens (checked), and block latents within 1e-4 of the reference path (checked).

    python benchmarks/cola_generation.py                 # CPU, one thread, the spec §16 tiny configuration
    python benchmarks/cola_generation.py --device cuda --size small --batch 16

Paths (``cola_reference.pipeline(…, cfg_batching, history, planning)``; only ``fast`` is the library's
``ColaPipeline``, the others run it the ways of benchmarks/cola_reference.py):
  reference   two_pass + kv_cache  + per_call   THE BASELINE, the reference's way (spec §3, §5, §6): a cond
                                                forward reading the cache and a separate uncond forward per
                                                Euler step; every call rebuilds the mask, positions and RoPE
                                                tables, concatenates and rotates the whole cached history, and
                                                runs the timestep embedding and AdaLN per token
  fast        batched  + kv_cache  + per_block  the fast path: one 2B-row forward per step, cond rows reading
                                                the cache; mask, RoPE tables and the laid-out history (keys
                                                rotated once) built once per block; timestep embedding and AdaLN
                                                once per distinct timestep (ColaDiT.plan / ColaDiT.step)
  cfg-batch   batched  + kv_cache  + per_call   the fast path without the per-block plan (batching alone)
  plan        two_pass + kv_cache  + per_block  the reference's two forwards, each planned (planning alone)
  recompute   batched  + recompute + per_call   no KV cache: the whole history is re-run at every call

Time (``--clock``) is by default the process's CPU time on a CPU device (on a shared machine, time spent
waiting for a core is not counted) and wall time on CUDA. Each path runs ``--repeats`` times, the paths
interleaved; the table gives the best and the median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from cola_reference import CfgBatching, History, Planning
from cola_reference import pipeline as cola_pipeline

from cdlm.interfaces import GenerateRequest
from cdlm_cola.config import ColaConfig, ColaDitConfig, ColaSampleConfig, ColaVaeConfig
from cdlm_cola.dit import ColaDiT
from cdlm_cola.generate import ColaPipeline
from cdlm_cola.vae import ColaTextVAE

SIZES = {
    # spec §16: DiT 128 wide, 2 layers, 4 heads × 32, rope 24, block 4, d 8; VAE 128 / 512, 2 + 2 blocks
    "tiny": (
        {"txt_dim": 128, "emb_dim": 128, "heads": 4, "head_dim": 32, "num_layers": 2, "rope_dim": 24, "block_size": 4},
        {"dim": 128, "ffn_dim": 512, "encoder_num_blocks": 2, "decoder_num_blocks": 2, "num_heads": 4, "block_size": 4},
    ),
    "small": (
        {"txt_dim": 512, "emb_dim": 512, "heads": 8, "head_dim": 64, "num_layers": 8, "rope_dim": 48, "block_size": 16},
        {
            "dim": 512,
            "ffn_dim": 2048,
            "encoder_num_blocks": 2,
            "decoder_num_blocks": 2,
            "num_heads": 8,
            "block_size": 16,
        },
    ),
}
PATHS: dict[str, tuple[CfgBatching, History, Planning, str]] = {  # name → pipeline options, what the row shows
    "reference": ("two_pass", "kv_cache", "per_call", "BASELINE: the reference's way, every ratio is against it"),
    "fast": ("batched", "kv_cache", "per_block", "the fast path: batched CFG + per-block plan"),
    "cfg-batch": ("batched", "kv_cache", "per_call", "batched CFG alone"),
    "plan": ("two_pass", "kv_cache", "per_block", "per-block plan alone"),
    "recompute": ("batched", "recompute", "per_call", "no KV cache"),
}
LATENT = 8
VOCAB = 320


def build(size: str, device: torch.device) -> tuple[ColaTextVAE, ColaDiT]:
    dit_shape, vae_shape = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    vae = ColaTextVAE(ColaVaeConfig(vocab_size=VOCAB, latent_dim=LATENT, **vae_shape), gen)
    dit = ColaDiT(ColaDitConfig(txt_in_channels=LATENT, txt_out_channels=LATENT, **dit_shape), gen)
    return vae.to(device).eval(), dit.to(device).eval()


def pipeline(vae: ColaTextVAE, dit: ColaDiT, path: str) -> ColaPipeline:
    cfg = ColaConfig(pad_id=3, eos_id=0, im_end_id=None, per_sample_noise_seed=66)  # no early EOS stop
    cfg_batching, history, planning, _ = PATHS[path]
    return cola_pipeline(cfg, vae, dit, cfg_batching, history, planning)


def make_request(batch: int, blocks: int, steps: int, block_size: int) -> GenerateRequest:
    """The benchmark's request: ``batch`` prompts of 1 … 6 blocks (mid-block tails), CFG 7, greedy + penalty 1.1."""
    gen = torch.Generator().manual_seed(1)
    lengths = [int(n) for n in torch.randint(1, 6 * block_size, (batch,), generator=gen)]
    prompts = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    settings = ColaSampleConfig(
        steps=steps, sampler="euler", grid="uniform", guidance=7.0, temperature=0.0, repetition_penalty=1.1,
        max_new_tokens=blocks * block_size, batch_size=batch,
    )  # fmt: skip
    return GenerateRequest(batch, prompts, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=4, help="prompts per batch")
    parser.add_argument("--blocks", type=int, default=8, help="generated blocks per prompt")
    parser.add_argument("--steps", type=int, default=16, help="Euler steps per block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the spec's timings use one)")
    parser.add_argument("--clock", choices=["cpu", "wall"], help="default: cpu on a CPU device, wall on CUDA")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vae, dit = build(args.size, device)
    bs = dit.config.block_size
    request = make_request(args.batch, args.blocks, args.steps, bs)
    lengths = [len(p) for p in request.prompts]

    clock_name = args.clock or ("cpu" if device.type == "cpu" else "wall")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter

    def run(path: str) -> tuple[list[list[int]], list[torch.Tensor], float]:
        blocks: list[torch.Tensor] = []
        pipe = pipeline(vae, dit, path)

        def on_step(info):  # noqa: ANN001, ANN202
            if info.index == args.steps - 1:
                blocks.append(info.z)

        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        out = pipe(request, torch.Generator().manual_seed(0), on_step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.ids, blocks, clock() - start

    baseline_ids, baseline_z, _ = run("reference")  # warm-up, and the outputs every path must reproduce
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for _ in range(args.repeats):
        for path in PATHS:  # interleaved, so machine noise hits every path alike
            ids, z, seconds = run(path)
            assert ids == baseline_ids, f"{path}: token ids differ from the reference path"
            err = max((a - b).abs().max().item() for a, b in zip(z, baseline_z, strict=True))
            assert err < 1e-4, f"{path}: block latents differ from the reference path by {err:.2e}"
            times[path].append(seconds / args.blocks)
    print(
        f"cola generation, {args.size} (DiT {dit.config.txt_dim}×{dit.config.num_layers}, bs {bs}), batch {args.batch},"
        f" {args.blocks} blocks × {args.steps} Euler steps, cfg 7, {args.device}, {args.threads} thread(s), "
        f"{args.repeats} runs each, {clock_name} time; prompt lengths {lengths}"
    )
    base, base_median = min(times["reference"]), statistics.median(times["reference"])
    print(
        f"{'path':<11} {'cfg':<9} {'history':<10} {'planning':<10} {'best ms/block':>14} {'speed-up':>9} "
        f"{'median':>8} {'speed-up':>9}  what"
    )
    for path, (cfg_batching, history, planning, what) in PATHS.items():
        best, median = min(times[path]), statistics.median(times[path])
        print(
            f"{path:<11} {cfg_batching:<9} {history:<10} {planning:<10} {best * 1e3:>14.2f} {base / best:>8.2f}x "
            f"{median * 1e3:>8.2f} {base_median / median:>8.2f}x  {what}"
        )
    print("speed-up: the reference path's time over the path's (best over best, median over median)")
    print("token ids identical on every path; block latents within 1e-4 of the reference path")


if __name__ == "__main__":
    main()
