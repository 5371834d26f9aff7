"""Does a Cola prior read its history? Its flow loss against what unigram and bigram statistics allow.

    python benchmarks/cola_history.py --run runs/compare/cola-tiny

Issue 11's diagnosis of ``cola-tiny`` (samples at the level of unigram tokens). On held-out text (Persuasion) it
measures, per Cola time τ (1 = noise):

* **the DiT**: the flow-matching loss (per latent, mean over channels) and the accuracy of ``x̂_0 = z_τ − τ·v̂``
  decoded by the VAE, on every block after the first, with the true clean history, another row's history and
  Gaussian noise as history. A prior that reads its history loses accuracy when the history is wrong;
* **Bayes-optimal denoisers** of the same noisy latents, which know each token's latent and either the unigram
  frequencies (no history) or the previous token's bigram frequencies (one token of history), counted on the
  training novels. They bound what a denoiser of non-contextual latents can reach with that knowledge;
* **the latents**: their variance, the part left within a token (0: every occurrence of a token gets the same
  latent, which the Bayes rows assume) and within the previous token (what one token of history leaves).

Prints a Markdown table; ``--json`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
from pathlib import Path

import torch
from torch import Tensor

from cdlm.api import load_pretrained
from cdlm.interfaces import Method
from cdlm_cola.objective_flow import NOISY, two_layout

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "austen"


def read_text(path: Path) -> str:
    """The text of a ``.txt`` or ``.txt.gz`` file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def within_variance(z: Tensor, keys: Tensor, min_count: int = 10) -> float:
    """Mean per-channel variance of latents z (N, C) within groups of equal ``keys`` (N,) of ≥ ``min_count``."""
    total, count = 0.0, 0
    for key in keys.unique():
        group = z[keys == key]
        if len(group) >= min_count:
            total += group.var(0).mean().item() * len(group)
            count += len(group)
    return total / max(count, 1)


def bayes(
    tokens: Tensor, latents: Tensor, prior: Tensor, tau: float, generator: torch.Generator
) -> tuple[float, float]:
    """Flow loss and token accuracy of the Bayes-optimal denoiser of non-contextual latents.

    Args:
        tokens: (N,) the scored tokens.
        latents: (V, C) every token's latent; the clean latents are ``latents[tokens]``.
        prior: (N, V) probabilities of each token before the noisy latent is seen.
        tau: Cola time; ``z_τ = (1 − τ)·z_0 + τ·ε`` and the velocity is ``(z_τ − z_0)/τ``.
        generator: the noise draws.
    """
    z0 = latents[tokens]  # (N, C)
    zt = (1 - tau) * z0 + tau * torch.randn(z0.shape, generator=generator)  # (N, C)
    log_lik = -(zt[:, None, :] - (1 - tau) * latents[None]).pow(2).sum(-1) / (2 * tau**2)  # (N, V)
    posterior = torch.softmax(log_lik + prior.clamp_min(1e-12).log(), dim=-1)  # (N, V)
    loss = ((z0 - posterior @ latents) / tau).pow(2).mean().item()
    return loss, (posterior.argmax(-1) == tokens).float().mean().item()


def dit_with_history(
    method: Method, z0: Tensor, history: Tensor, tau: float, n: int, seed: int
) -> tuple[Tensor, Tensor]:
    """The DiT's per-latent loss (B, n) and x̂_0 token ids (B, n) when the clean half of the 2L layout is ``history``.

    Args:
        method: a built Cola method.
        z0: (B·n, C) clean latents of B rows of n latents.
        history: (B·n, C) what the noisy copies attend to as their clean history.
        tau: one Cola time for every latent.
        n: latents per row.
        seed: the noise draws (equal across histories, so only the history differs).
    """
    dit, vae, schedule = method.denoiser.dit, method.embedder.vae, method.schedule
    rows = z0.shape[0] // n
    z1 = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    states = torch.full((rows * n,), NOISY)
    trained = torch.ones(rows * n, dtype=torch.bool)
    base = two_layout(
        z0, z1, torch.full((rows,), tau), states, trained, [n] * rows, [dit.config.block_size] * rows, schedule
    )
    txt = base.txt.view(rows, 2, n, -1).clone()  # (B, [clean | noisy], n, C)
    txt[:, 0] = history.view(rows, n, -1)
    layout = dataclasses.replace(base, txt=txt.flatten(0, 2))
    out = layout.run(dit).view(rows, 2, n, -1)[:, 1]  # (B, n, C) velocities of the noisy copies
    loss = (out - base.target.view(rows, n, -1)).pow(2).mean(-1)  # (B, n)
    x0 = txt[:, 1] - tau * out  # (B, n, C)
    logits = vae.decode(x0.flatten(0, 1), [n] * rows, [n] * rows)  # (B·n, V)
    return loss, logits.argmax(-1).view(rows, n)


def encode(method: Method, ids: Tensor, group: int = 16) -> Tensor:
    """Posterior-mode latents (B, n, C) of token rows ``ids`` (B, L), ``group`` rows per VAE call."""
    return torch.cat([torch.stack(method.embedder.encode(list(rows))) for rows in ids.split(group)])


def reconstruction(method: Method, z: Tensor, ids: Tensor) -> float:
    """Token accuracy of the VAE decoding the clean latents z (B, n, C) of ``ids`` (B, n)."""
    rows, n = ids.shape
    logits = method.embedder.vae.decode(z.flatten(0, 1), [n] * rows, [n] * rows)  # (B·n, V)
    return (logits.argmax(-1).view(rows, n) == ids).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a Cola run (or checkpoint)")
    parser.add_argument("--data", type=Path, default=DATA, help="the training novels (*.txt.gz / *.txt)")
    parser.add_argument("--holdout", default="persuasion.txt.gz", help="the held-out file of --data that is scored")
    parser.add_argument("--taus", default="0.3,0.5,0.7,0.9", help="Cola times (1 = noise)")
    parser.add_argument("--rows", type=int, default=48, help="held-out rows of 64 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the table as JSON")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    with torch.no_grad():
        table, facts = measure(args)
    lines = [
        "| τ | DiT loss: true / other row's / noise history | DiT x̂₀ accuracy: true / other / noise | "
        "Bayes unigram: loss, accuracy | Bayes bigram: loss, accuracy |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['tau']} | {r['dit_loss']['true']:.3f} / {r['dit_loss']['other']:.3f} / {r['dit_loss']['noise']:.3f} "
            f"| {r['dit_acc']['true']:.3f} / {r['dit_acc']['other']:.3f} / {r['dit_acc']['noise']:.3f} "
            f"| {r['unigram'][0]:.3f}, {r['unigram'][1]:.3f} | {r['bigram'][0]:.3f}, {r['bigram'][1]:.3f} |"
        )
    print(
        f"latents: variance {facts['variance']:.3f} per channel, {facts['within_token']:.3f} within a token, "
        f"{facts['within_previous']:.3f} within the previous token; the VAE decodes them to "
        f"{facts['reconstruction']:.3f} of the tokens ({facts['tokens']:,} held-out tokens)"
    )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"latents": facts, "rows": table}, indent=2) + "\n", encoding="utf-8")


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """The table's rows (one per τ) and the latent statistics."""
    model = load_pretrained(args.run, device="cpu")
    if model.config.method != "cola":
        raise SystemExit(f"--run {args.run}: method {model.config.method!r}; this diagnostic reads a Cola prior")
    method, tok = model.method, model.tokenizer
    vocab = method.vocab_size
    n = 64
    train = [p for p in sorted(args.data.iterdir()) if p.name.endswith((".txt", ".txt.gz")) and p.name != args.holdout]
    if not train or not (args.data / args.holdout).is_file():
        raise SystemExit(f"--data {args.data}: expected text files and the held-out {args.holdout}")
    counts = torch.ones(vocab, vocab)  # add-one smoothed bigram counts, [previous, next]
    for path in train:
        ids = torch.tensor(tok(read_text(path))["input_ids"])
        counts.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1), accumulate=True)
    unigram = counts.sum(0) / counts.sum()  # (V,)
    bigram = counts / counts.sum(1, keepdim=True)  # (V, V)
    held = torch.tensor(tok(read_text(args.data / args.holdout))["input_ids"])
    start = len(held) // 4  # past the front matter
    ids = held[start : start + args.rows * n].view(args.rows, n)  # (B, n)
    z = encode(method, ids)  # (B, n, C)
    flat, prev, cur = z[:, 1:].flatten(0, 1), ids[:, :-1].flatten(), ids[:, 1:].flatten()
    facts = {
        "tokens": ids.numel(),
        "variance": flat.var(0).mean().item(),
        "within_token": within_variance(flat, cur),
        "within_previous": within_variance(flat, prev),
        "reconstruction": reconstruction(method, z, ids),
    }
    # each token's latent: the mean over its held-out occurrences, else the latent it gets alone
    alone = [z for group in torch.arange(vocab).split(16 * n) for z in method.embedder.encode(list(group.split(n)))]
    latents = torch.cat(alone)  # (V, C): the ids in rows of n, 16 rows per VAE call
    for token in cur.unique():
        latents[token] = flat[cur == token].mean(0)
    block = method.denoiser.dit.config.block_size
    z0 = z.flatten(0, 1)  # (B·n, C)
    histories = {
        "true": z0,
        "other": z.roll(1, dims=0).flatten(0, 1),
        "noise": torch.randn(z0.shape, generator=torch.Generator().manual_seed(args.seed + 1)),
    }
    table = []
    for tau in (float(t) for t in args.taus.split(",")):
        row: dict = {"tau": tau, "dit_loss": {}, "dit_acc": {}}
        for name, history in histories.items():
            loss, pred = dit_with_history(method, z0, history, tau, n, args.seed)
            row["dit_loss"][name] = loss[:, block:].mean().item()
            row["dit_acc"][name] = (pred == ids)[:, block:].float().mean().item()
        for name, prior in (("unigram", unigram.expand(len(cur), vocab)), ("bigram", bigram[prev])):
            row[name] = bayes(cur, latents, prior, tau, torch.Generator().manual_seed(args.seed))
        table.append(row)
    return table, facts


if __name__ == "__main__":
    main()
