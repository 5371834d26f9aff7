"""Official ELF checkpoints (``lillian039/ELF``, branch pytorch_elf; spec §1.6), read and written as they are.

A release is one ``torch.save`` file ``checkpoint_<step>`` (no extension), alone or in a directory (the largest
step wins, as the reference ``load_checkpoint`` does). Its payload, in the official key layout of spec §1.5::

    params              OrderedDict  the raw weights, 23 + 12·depth tensors, reference state_dict() order
    ema_params1         dict         EMA shadows of the same keys; sampling uses them
    opt_state           dict         Muon + Adam state_dict: param_groups [0] Muon (2-D), [1] Adam (the rest)
    lr_scheduler        dict         LambdaLR state_dict
    step, epoch         int
    dropout_rng         uint8 (5056,) CPU torch.Generator state
    grad_accum_buffers  dict         {}

The network's shape is inferred from the tensor shapes. What the weights do not fix (``model.max_length``, the
tokenizer, the T5 encoder, the sampling settings) comes from the paper recipe of that size (else ``elf-105m``); set
it with ``--set``, e.g. ``--set model.max_length=128 --set data.seq_len=128 --set model.encoder.pretrained=DIR
--set data.tokenizer=DIR`` (De-En checkpoints: L = 128; XSum: 1088).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from cdlm.errors import CheckpointError
from cdlm.interfaces import ReleasedCheckpoint, ReleasedFormat
from cdlm.recipes import read_with_extends, resolve
from cdlm.training.optim import Muon, lr_factor
from cdlm_elf.config import ElfConfig
from cdlm_elf.model import ElfTransformer
from cdlm_elf.state_dict import PREFIX, ElfStateDictAdapter

FILE_NAME = re.compile(r"checkpoint_(\d+)")
BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
PAPER_RECIPES = ("elf-105m", "elf-342m", "elf-652m")  # ELF-B, -M, -L (spec §1.1); the first is the fallback
SIZE_FIELDS = ("hidden_size", "depth", "num_heads")  # what picks the paper recipe
INFERRED = {"latent_dim", "hidden_size", "depth", "num_heads", "mlp_ratio", "bottleneck_dim", "vocab_size"}


class ElfOfficialCheckpoint(ReleasedFormat):
    """The reference ``checkpoint_<N>`` file: detect it, read it into our keys, write it back (``cdlm convert``)."""

    name: ClassVar[str] = "elf-official"

    def detect(self, path: Path) -> bool:
        """Return whether ``path`` is a ``checkpoint_<N>`` file or a directory holding one; loads nothing."""
        path = Path(path)
        if path.is_file():
            return FILE_NAME.fullmatch(path.name) is not None
        return path.is_dir() and _latest(path) is not None

    def read(self, path: Path) -> ReleasedCheckpoint:
        """Read an official checkpoint: its recipe (shape inferred from the weights), weights, EMA and step.

        Args:
            path: a ``checkpoint_<N>`` file, or a directory holding such files (the largest N is read).

        Returns:
            The recipe (a raw mapping: the base paper recipe with the inferred ``model:`` shape and
            ``data.seq_len = model.max_length``), ``params`` and ``ema_params1`` in our ``network.…`` keys
            (``ema`` None when the file has no ``ema_params1``) and ``step`` (None when absent).

        Raises:
            CheckpointError: no checkpoint file, not a torch payload, no ``params``, or weights that do not fit
                one ELF network; the message names the file.
        """
        file = _checkpoint_file(Path(path))
        payload = _load(file)
        params, ema = payload.get("params"), payload.get("ema_params1")
        if not isinstance(params, Mapping) or not params:
            found = "no 'params' key" if params is None else f"'params' is a {type(params).__name__}"
            raise CheckpointError(
                f"{file}: {found}; expected an official ELF checkpoint whose 'params' is the model state dict "
                f"(spec §1.6); top-level keys found: {sorted(map(str, payload))}"
            )
        recipe = _recipe(_infer_model(params, file), file)
        cfg = ElfConfig.model_validate(recipe["model"])
        _check_shapes(params, ema, cfg, file)
        step = payload.get("step")
        if step is not None and not isinstance(step, int):
            raise CheckpointError(f"{file}: 'step' is a {type(step).__name__}, expected an int")
        adapter = ElfStateDictAdapter(cfg)
        try:
            weights, shadows = adapter.from_official(params), None if ema is None else adapter.from_official(ema)
        except CheckpointError as err:
            raise CheckpointError(f"{file}: {err}") from None
        return ReleasedCheckpoint(recipe=recipe, weights=weights, ema=shadows, step=step)

    def write(
        self,
        directory: Path,
        *,
        config: Any,
        weights: Mapping[str, Tensor],
        ema: Mapping[str, Tensor] | None,
        step: int,
        tokenizer: Any,
    ) -> Path:
        """Write ``directory/checkpoint_<step>`` in the reference layout, atomically; ``tokenizer`` is not stored.

        ``opt_state`` and ``lr_scheduler`` are those of a fresh reference optimizer (Muon + Adam over the official
        parameter order, hyper-parameters from ``config.train``, empty state) whose schedule stands at ``step``:
        the reference resumes from them. ``ema_params1`` holds the raw weights when ``ema`` is None.

        Raises:
            CheckpointError: ``weights`` / ``ema`` do not hold exactly the network keys of ``config.model``.
        """
        directory = Path(directory)
        out = directory / f"checkpoint_{step}"
        adapter = ElfStateDictAdapter(config.model)
        try:
            params = _official(adapter, weights)
            shadows = params if ema is None else _official(adapter, ema)
        except CheckpointError as err:
            raise CheckpointError(f"{out}: {err}") from None
        opt_state, lr_state = _fresh_optimizer(list(params.values()), config.train, step)
        payload = {
            "params": params,
            "ema_params1": dict(shadows),
            "opt_state": opt_state,
            "lr_scheduler": lr_state,
            "step": int(step),
            "epoch": 0,
            "dropout_rng": torch.Generator().manual_seed(config.seed).get_state(),  # uint8 (5056,)
            "grad_accum_buffers": {},
        }
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{out.name}.", suffix=".tmp")  # never matches FILE_NAME
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out


def _latest(directory: Path) -> Path | None:
    """Return the ``checkpoint_<N>`` file of largest N directly under ``directory``, or None."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := FILE_NAME.fullmatch(p.name)) and p.is_file()]
    return max(found)[1] if found else None


def _checkpoint_file(path: Path) -> Path:
    """Return the file to read: ``path`` itself, or the latest ``checkpoint_<N>`` of a directory."""
    file = _latest(path) if path.is_dir() else path
    if file is None or not file.is_file():
        what = "holds no checkpoint_<N> file" if path.is_dir() else "no such file"
        raise CheckpointError(f"{path}: {what}; expected an official ELF checkpoint_<N> file (spec §1.6)")
    return file


def _load(file: Path) -> Mapping[str, Any]:
    """``torch.load`` (CPU, weights only) the payload dict of ``file``."""
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, … on foreign files
        reason = next(iter(str(err).splitlines()), "")
        raise CheckpointError(
            f"{file}: not a readable torch.save payload ({type(err).__name__}: {reason}); "
            "expected an official ELF checkpoint_<N> file (spec §1.6)"
        ) from None
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{file}: torch.load gave a {type(payload).__name__}, expected the checkpoint dict")
    return payload


def _infer_model(params: Mapping[str, Any], file: Path) -> dict[str, Any]:
    """Return the ``model:`` shape fields fixed by the official state dict (spec §1.5 inference rules)."""

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        value = params.get(key)
        if not isinstance(value, Tensor) or value.ndim != ndim:
            found = "missing" if value is None else f"a {type(value).__name__} of shape {getattr(value, 'shape', '')}"
            raise CheckpointError(f"{file}: params[{key!r}] is {found}; expected a {ndim}-D tensor (spec §1.5)")
        return tuple(value.shape)

    _, num_time, hidden = shape("t_emb_tokens", 3)  # (1, 4, H)
    head_dim = shape("blocks.0.attn.q_norm.weight", 1)[0]  # (hd,)
    bottleneck, latent = shape("text_proj.proj1.weight", 2)  # (128, C)
    if hidden % head_dim:
        raise CheckpointError(f"{file}: hidden size {hidden} is not a multiple of the q_norm head dim {head_dim}")
    return {
        "latent_dim": latent,
        "hidden_size": hidden,
        "depth": len({int(m.group(1)) for key in params if (m := BLOCK_KEY.match(key))}),
        "num_heads": hidden // head_dim,
        "mlp_ratio": _mlp_ratio(hidden, shape("blocks.0.mlp.w12.weight", 2)[0] // 2, file),  # w12: (2·Hf, H)
        "bottleneck_dim": bottleneck,
        "num_time_tokens": num_time,
        "num_self_cond_cfg_tokens": shape("self_cond_cfg_tokens", 3)[1],
        "num_mode_tokens": shape("mode_tokens", 3)[1],
        "vocab_size": shape("unembed_bias", 1)[0],  # (V,)
    }


def _mlp_ratio(hidden: int, inner: int, file: Path) -> float:
    """Invert the SwiGLU width ``inner = int(int(H·r)·2/3)``: the shortest decimal r that rebuilds it exactly."""
    widths = [m for m in range(max(1, 3 * inner // 2 - 2), 3 * inner // 2 + 3) if int(m * 2 / 3) == inner]
    candidates = [round(m / hidden, digits) for digits in range(7) for m in widths] + [m / hidden for m in widths]
    for ratio in candidates:
        if ratio > 0 and int(int(hidden * ratio) * 2 / 3) == inner:
            return ratio
    raise CheckpointError(f"{file}: no mlp_ratio gives the SwiGLU width {inner} at hidden size {hidden}")


def _recipe(shape: Mapping[str, Any], file: Path) -> dict[str, Any]:
    """The paper recipe of this size (else ELF-B's), with the inferred shape and ``data.seq_len = max_length``."""
    bases = {name: read_with_extends(resolve(name)) for name in PAPER_RECIPES}
    name = next((n for n, raw in bases.items() if all(raw["model"][k] == shape[k] for k in SIZE_FIELDS)), None)
    raw = bases[name or PAPER_RECIPES[0]]
    raw["model"] = {**raw["model"], **shape}
    raw["data"] = {**raw.get("data", {}), "seq_len": raw["model"]["max_length"]}
    raw["description"] = (
        f"official ELF checkpoint {file} ({shape['depth']} blocks, hidden {shape['hidden_size']}); "
        f"max_length, encoder, tokenizer and sampling from {name or PAPER_RECIPES[0]}"
        + ("" if name else " (no paper size matches)")
    )
    return raw


def _check_shapes(params: Mapping[str, Any], ema: Any, cfg: ElfConfig, file: Path) -> None:
    """Rebuild the inferred network on meta and compare every official tensor shape (params and EMA)."""
    with torch.device("meta"):
        expected = ElfStateDictAdapter(cfg).to_official(nn.ModuleDict({"network": ElfTransformer(cfg)}).state_dict())
    if ema is not None and not isinstance(ema, Mapping):
        raise CheckpointError(f"{file}: 'ema_params1' is a {type(ema).__name__}, expected a dict of tensors")
    for what, sd in (("params", params), ("ema_params1", ema or {})):
        found = {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in sd.items()}
        wrong = [f"{k} {found[k]} ≠ {tuple(v.shape)}" for k, v in expected.items() if found.get(k, v.shape) != v.shape]
        if wrong:
            raise CheckpointError(
                f"{file}: {what} tensors do not fit one ELF network ({', '.join(wrong[:4])}); "
                f"inferred {cfg.model_dump(include=INFERRED)}"
            )


def _official_order(depth: int) -> list[str]:
    """Official keys in the reference ``state_dict()`` order: the adapter table, block keys grouped by block."""
    templates = list(ElfStateDictAdapter.TABLE)
    block = [t for t in templates if "{i}" in t]  # contiguous in the table
    first = templates.index(block[0])
    return [*templates[:first], *(t.format(i=i) for i in range(depth) for t in block), *templates[first + len(block) :]]


def _official(adapter: ElfStateDictAdapter, sd: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Our ``network.…`` keys (others, e.g. the frozen ``embedder.…``, are dropped) → official keys, in order."""
    mapped = adapter.to_official({k: v for k, v in sd.items() if k.startswith(PREFIX)})
    return OrderedDict((key, mapped[key].detach().cpu()) for key in _official_order(adapter.depth))


def _fresh_optimizer(params: list[Tensor], train: Any, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the reference optimizer's and LambdaLR's state dicts, as saved after ``step`` steps.

    Muon + Adam (2-D → Muon) over ``params`` in official order, with an empty state; the schedule stands at ``step``.
    """
    hyper = {"lr": train.lr, "momentum": train.muon_momentum, "betas": tuple(train.betas), "eps": train.eps}
    muon, adam = [p for p in params if p.ndim == 2], [p for p in params if p.ndim != 2]
    optimizer = Muon(muon, adam, **hyper, weight_decay=train.weight_decay)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # LambdaLR's base lr; needed to start it at last_epoch = step
    schedule = LambdaLR(optimizer, lambda s: lr_factor(s, train), last_epoch=step - 1)  # its first step lands on step
    lr_state = schedule.state_dict()  # lr_lambdas: [None, None] (plain functions are not saved)
    lr_state["_step_count"] = step + 1  # the initial step plus `step` steps
    return optimizer.state_dict(), lr_state
