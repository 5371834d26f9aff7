"""Cola 2L training step: samples of equal length as one batched call against groups of 4 NA samples.

Question: what does a DiT training step (forward, flow-matching loss, backward) cost at batch 4 / 16 / 64 when
the samples of a fixed-length batch attend as a batch (per-sample 2L mask, linear in B) rather than as the
previous default, NA calls of 4 samples each (``SAMPLES_PER_CALL``; one call over all B would be quadratic)?
Losses must agree within 1e-6 relative (checked). Timed by ``benchmarks/run.py``; alone:

    python benchmarks/cola_training.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from cdlm_cola.config import ColaConfig
from cdlm_cola.objective_flow import NOISY, TwoLayout, two_layout
from cdlm_cola.schedule import ColaSchedule

GROUP = 4  # the previous SAMPLES_PER_CALL
LATENTS = 64  # latents per sample: 16 blocks of 4, a 2L row of 128


def layout_of(batch: int, channels: int, block_size: int) -> TwoLayout:
    """A fixed-length 2L training batch: random latents, noise and τ, every latent noisy and trained."""
    g = torch.Generator().manual_seed(batch)
    z0 = torch.cat([torch.randn(LATENTS, channels, generator=g) for _ in range(batch)])
    z1 = torch.cat([torch.randn(LATENTS, channels, generator=g) for _ in range(batch)])
    states, valid = torch.full((batch * LATENTS,), NOISY), torch.ones(batch * LATENTS, dtype=torch.bool)
    tau, lens, sizes = torch.rand(batch, generator=g), [LATENTS] * batch, [block_size] * batch
    return two_layout(z0, z1, tau, states, valid, lens, sizes, ColaSchedule(ColaConfig()))


def grouped(batch: TwoLayout, dit: torch.nn.Module) -> torch.Tensor:
    """The previous way: NA calls of ``GROUP`` samples, each with its (1, 1, Σ2n, Σ2n) mask."""
    lens = [2 * n for n in batch.seq_lens]
    bounds = torch.tensor([0, *lens]).cumsum(0).tolist()
    out = []
    for start in range(0, len(lens), GROUP):
        stop = min(start + GROUP, len(lens))
        rows, group = slice(bounds[start], bounds[stop]), slice(start, stop)
        pos = batch.positions[rows]
        out.append(dit(batch.txt[rows], lens[group], lens[group], batch.timestep[rows], k_positions=pos,
                       q_positions=pos, mask=batch.mask(group)))  # fmt: skip
    return torch.cat(out)


def steps(dit: torch.nn.Module, size: int) -> dict[str, Callable[[], float]]:
    """One timed training step (forward, loss, backward) per path at batch ``size``; each returns its seconds."""
    batch = layout_of(size, dit.config.txt_in_channels, dit.config.block_size)
    paths = {"reference": lambda: grouped(batch, dit), "cdlm": lambda: batch.run(dit)}
    losses = {name: batch.term(run()).mean().item() for name, run in paths.items()}
    assert abs(losses["cdlm"] - losses["reference"]) <= 1e-6 * abs(losses["reference"]), f"losses differ: {losses}"

    def timed(run: Callable[[], torch.Tensor]) -> Callable[[], float]:
        def step() -> float:
            start = time.process_time()
            batch.term(run()).mean().backward()
            dit.zero_grad(set_to_none=True)
            return time.process_time() - start

        return step

    return {name: timed(run) for name, run in paths.items()}


def main() -> None:
    from cola_generation import build

    torch.set_num_threads(1)
    _, dit = build("tiny", torch.device("cpu"))
    dit.train()
    for size in (4, 16, 64):
        times: dict[str, list[float]] = {"reference": [], "cdlm": []}
        pair = steps(dit, size)
        for _ in range(5):
            for name, step in pair.items():
                times[name].append(step())
        ref, ours = times["reference"], times["cdlm"]
        median = statistics.median(ref) / statistics.median(ours)
        print(f"batch {size:>2}: groups of {GROUP} {min(ref) * 1e3:8.1f} ms, batched {min(ours) * 1e3:8.1f} ms, "
              f"{min(ref) / min(ours):.2f}× (median {median:.2f}×)")  # fmt: skip


if __name__ == "__main__":
    main()
