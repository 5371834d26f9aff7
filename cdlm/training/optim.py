"""Optimisers and the learning-rate schedule: Muon with an auxiliary Nesterov-Adam (ELF spec §3.5), or AdamW.

Muon orthogonalises the (bias-corrected Nesterov) momentum of every 2-D weight with five Newton–Schulz
iterations; every other parameter (biases, norm weights, prefix tokens) is updated by Nesterov-Adam.
2-D weights are taken to be ``nn.Linear`` weights, stored (out, in): the update is scaled by
``√max(1, fan_out/fan_in) = √max(1, rows/cols)``.

Under FSDP a weight, its gradient and its momentum are sharded by rows across processes, but Newton–Schulz
needs the whole matrix: each weight's Nesterov momentum is gathered (one all-gather of the weight's size),
orthogonalised, and every process keeps its own rows of the update. Every process computes Newton–Schulz for
every weight, as under DDP, so a sharded step equals the unsharded one to fp32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from cdlm.config import TrainConfig
from cdlm.errors import RecipeError
from cdlm.training.sharding import full_tensor, shard_like

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton–Schulz coefficients (a, b, c), spec §3.5
NS_STEPS = 5
NS_EPS = 1e-8


NsSide = Literal["auto", "direct", "gram"]
GRAM_ASPECT = 4
"""``auto`` iterates on the Gram side when the long side is at least this many times the short side."""


def newton_schulz(u: Tensor, steps: int = NS_STEPS, side: NsSide = "auto") -> Tensor:
    """Approximately orthogonalise a matrix: its singular values are pushed into a band around 1.

    Both sides compute ``X ← a·X + (b·G + c·G²)·X`` with ``G = X·Xᵀ`` on the wide orientation X (m, n), m ≤ n:

    - ``direct`` runs that recurrence as written: 5 × 2·m²·n multiply-adds (the reference's way).
    - ``gram`` uses that every iterate is ``X_k = Q_k·X_0`` with ``Q_k`` a polynomial in ``A = X_0·X_0ᵀ``, so
      all matrices commute: ``P = a + b·G + c·G²``, ``Q ← P·Q``, ``G ← P·G·P``, then ``X = Q·X_0``. Only
      ``A`` and the final product touch the long side (2·m²·n), the rest is (m, m). It is the same
      polynomial of the same matrix, so only rounding differs. Relative (Frobenius) error against the
      iteration in fp64: Gaussian inputs up to 512 × 32100 ≤ 4e-6, as ``direct`` in fp32; ill-conditioned
      ones (rank 8 + 1 % noise) ≤ 1e-4 (``direct``: 1.3e-5), because A = X₀·X₀ᵀ is formed in fp32. Muon's
      own map leaves singular values anywhere in [0.7, 1.2], so this is far below what the method tolerates;
      tests/training/test_optim.py checks both bounds.
    - ``auto`` picks ``gram`` when ``n ≥ 4·m`` (where it pays), else ``direct``.

    Args:
        u: (rows, cols) matrix, any float dtype; the iteration runs in fp32.
        steps: number of quintic iterations.
        side: ``auto``, ``direct`` or ``gram`` (see above).

    Returns:
        (rows, cols) fp32 matrix ≈ U·Vᵀ of the SVD u = U·S·Vᵀ (singular values in roughly [0.7, 1.2]).
    """
    x = u.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T.contiguous()  # (cols, rows): iterate on the wide side, the Gram matrix is the smaller one
    x = x / (torch.linalg.matrix_norm(x) + NS_EPS)  # (m, n), m ≤ n
    m, n = x.shape
    use_gram = side == "gram" or (side == "auto" and n >= GRAM_ASPECT * m)
    x = _ns_gram(x, steps) if use_gram else _ns_direct(x, steps)
    return x.T if tall else x


def _ns_direct(x: Tensor, steps: int) -> Tensor:
    """The quintic iteration on the wide matrix x (m, n) itself."""
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.T  # (m, m)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def _ns_gram(x: Tensor, steps: int) -> Tensor:
    """The same iteration carried by the (m, m) polynomial Q with ``X_k = Q·X_0`` (see :func:`newton_schulz`).

    The (m, m) recurrence runs in fp64 (a few m³ products, cheap next to the two m²·n ones): Q amplifies the
    directions of small singular values, and fp32 there would double the rounding error.
    """
    a, b, c = NS_COEFFS
    gram = (x @ x.T).double()  # (m, m) A = X₀·X₀ᵀ
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    q = eye
    for _ in range(steps):
        p = a * eye + b * gram + c * gram @ gram  # (m, m) P = p(G)
        q = p @ q
        gram = p @ gram @ p  # G_{k+1} = X_{k+1}·X_{k+1}ᵀ = P·G·Pᵀ, P symmetric
    return q.float() @ x  # (m, n)


def _nesterov(avg: Tensor, grad: Tensor, beta: float, step: int) -> Tensor:
    """Bias-corrected Nesterov momentum ``β·m/(1 − β^(t+1)) + (1 − β)·g/(1 − β^t)`` (optax form, spec §3.5)."""
    return avg * (beta / (1 - beta ** (step + 1))) + grad * ((1 - beta) / (1 - beta**step))


class Muon(Optimizer):
    """Muon for 2-D weights plus Nesterov-Adam for the rest, as two param groups [0] Muon, [1] Adam (ELF spec §3.5).

    The group keys and per-parameter state (``momentum_buffer``/``exp_avg``/``exp_avg_sq`` and an int ``step``)
    follow the reference optimiser, so its ``state_dict`` has the reference ``opt_state`` layout. A parameter
    without a gradient is stepped with a zero gradient, as the reference does.

    Args:
        muon_params: 2-D weights, stored (out, in).
        adam_params: every other trainable parameter.
        lr: learning rate of both groups.
        momentum: Muon's momentum β.
        betas: Adam's (b1, b2).
        eps: Adam's epsilon.
        weight_decay: decoupled decay of both groups, ``p ← p·(1 − lr·wd)``.
        ns_side: where Newton–Schulz iterates (:func:`newton_schulz`); ``direct`` is the reference's way.
    """

    def __init__(
        self,
        muon_params: Iterable[Tensor],
        adam_params: Iterable[Tensor],
        *,
        lr: float,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ns_side: NsSide = "auto",
    ) -> None:
        self.ns_side = ns_side  # an attribute, not a group key: param_groups keep the reference layout
        groups = [
            {"params": list(muon_params), "lr": lr, "momentum": momentum, "weight_decay": weight_decay},
            {"params": list(adam_params), "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay},
        ]
        super().__init__([{**g, "use_muon": i == 0} for i, g in enumerate(groups)], {})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one optimisation step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = self._muon_update if group["use_muon"] else self._adam_update
            for p in group["params"]:
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                delta = update(grad, state, group)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(delta.to(p.dtype), alpha=-group["lr"])
        return loss

    def _muon_update(self, grad: Tensor, state: dict, group: dict) -> Tensor:
        """Orthogonalised, shape-scaled Nesterov momentum of a (out, in) weight's gradient."""
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        beta = group["momentum"]
        buf = state["momentum_buffer"].lerp_(grad, 1 - beta)  # m ← β·m + (1 − β)·g
        momentum = _nesterov(buf, grad, beta, state["step"])  # (out, in), or this process's rows under FSDP
        ortho = newton_schulz(full_tensor(momentum), side=self.ns_side)  # (out, in) fp32, of the whole weight
        scaled = ortho * math.sqrt(max(1.0, grad.shape[0] / grad.shape[1]))  # √max(1, fan_out/fan_in)
        return shard_like(scaled, momentum)  # back to this process's rows under FSDP

    @staticmethod
    def _adam_update(grad: Tensor, state: dict, group: dict) -> Tensor:
        """Nesterov-Adam direction ``μ̂/(√ν̂ + eps)`` with bias corrections."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        (b1, b2), t = group["betas"], state["step"]
        avg = state["exp_avg"].lerp_(grad, 1 - b1)  # μ ← b1·μ + (1 − b1)·g
        avg_sq = state["exp_avg_sq"].lerp_(grad.square(), 1 - b2)  # ν ← b2·ν + (1 − b2)·g²
        return _nesterov(avg, grad, b1, t) / ((avg_sq / (1 - b2**t)).sqrt() + group["eps"])


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig) -> Optimizer:
    """Build the optimiser a recipe asks for over the trainable parameters.

    ``muon``: :class:`Muon` with every 2-D parameter in the Muon group (assumed ``nn.Linear`` (out, in)
    layout) and the rest in the Adam group, both using ``cfg.betas``/``cfg.eps`` for Adam.
    ``adamw``: ``torch.optim.AdamW`` with decoupled weight decay.

    Args:
        named_params: (name, parameter) pairs, e.g. ``Method.modules().named_parameters()``; parameters
            with ``requires_grad=False`` are skipped.
        cfg: the run's ``train:`` section (optimizer, lr, betas, eps, weight_decay, muon_momentum).

    Returns:
        The optimiser, with ``lr`` = ``cfg.lr`` in every group (the schedule scales it).

    Raises:
        RecipeError: no trainable parameter, or a trainable parameter that is not fp32.
    """
    params = [(name, p) for name, p in named_params if p.requires_grad]
    if not params:
        raise RecipeError(f"train.optimizer={cfg.optimizer!r}: no trainable parameters were given")
    wrong = [f"{name} ({p.dtype})" for name, p in params if p.dtype != torch.float32]
    if wrong:
        raise RecipeError(
            f"train.optimizer={cfg.optimizer!r}: trainable parameters must be fp32 (autocast handles bf16); "
            f"found {', '.join(wrong[:5])}{' …' if len(wrong) > 5 else ''}"
        )
    if cfg.optimizer == "adamw":
        return AdamW([p for _, p in params], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return Muon(
        [p for _, p in params if p.ndim == 2],
        [p for _, p in params if p.ndim != 2],
        lr=cfg.lr,
        momentum=cfg.muon_momentum,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Return the multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based).

    Linear warm-up from 0 over ``cfg.warmup_steps`` (the factor at step 0 is 0 when there is a warm-up,
    as in the reference), then ``constant``, ``cosine`` or ``linear`` decay to ``cfg.min_lr_ratio`` at
    ``cfg.steps``.
    """
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def build_lr_schedule(optimizer: Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Wrap ``optimizer`` in a ``LambdaLR`` following :func:`lr_factor`; step it after every optimizer step."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
