"""Official Cola checkpoint directories ↔ :class:`ColaDiT` / :class:`ColaTextVAE` (Cola spec §1.1, §2.1, §3.1).

A directory holds ``config.json`` and either ``model.safetensors`` or a sharded ``model.safetensors.index.json``
(the release DiT has two shards; saving shards above Hugging Face's 5 GB default, as the release did). Our
parameter names are the official ones, so the key mapping is the identity except for the DiT's deterministic
``blocks.{i}.msa.rope.rope.freqs`` buffers: accepted present or absent on load (and checked when present),
written back on save so the reference loads our files with no missing key. Loading is strict: any missing,
unexpected or mis-shaped key is a :class:`CheckpointError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from cdlm.errors import CheckpointError
from cdlm.shards import DEFAULT_SHARD_BYTES, write_weights
from cdlm.training.checkpoint import read_state_dict
from cdlm_cola.config import ColaDitConfig, ColaVaeConfig, read_dit_config, read_vae_config
from cdlm_cola.dit import ROPE_THETA, ColaDiT
from cdlm_cola.rope import inv_freq
from cdlm_cola.vae import ColaTextVAE

ROPE_FREQS = "blocks.{i}.msa.rope.rope.freqs"  # persistent buffer of the reference's rotary module (spec §3.1)
MAX_LISTED = 8
Model = TypeVar("Model", bound=nn.Module)


def dit_from_official(sd: Mapping[str, Tensor], config: ColaDitConfig) -> dict[str, Tensor]:
    """Return an official DiT state dict without its ``rope.freqs`` buffers, checking their values.

    Raises:
        CheckpointError: a buffer differs from ``1e4^(−2j/rope_dim)``, which our RoPE computes.
    """
    expected = inv_freq(config.rope_dim, ROPE_THETA)
    out = dict(sd)
    for i in range(config.num_layers):
        found = out.pop(ROPE_FREQS.format(i=i), None)
        if found is not None and (found.shape != expected.shape or not torch.allclose(found.float(), expected)):
            raise CheckpointError(
                f"{ROPE_FREQS.format(i=i)}: expected 1/10000^(arange(0, {config.rope_dim}, 2)/{config.rope_dim}) "
                f"{tuple(expected.shape)}, found other values {tuple(found.shape)}; rope_dim in config.json wrong?"
            )
    return out


def dit_to_official(sd: Mapping[str, Tensor], config: ColaDitConfig) -> dict[str, Tensor]:
    """Return our DiT state dict with the reference's ``rope.freqs`` buffers added (470 keys at release size)."""
    freqs = inv_freq(config.rope_dim, ROPE_THETA)
    return {**sd, **{ROPE_FREQS.format(i=i): freqs.clone() for i in range(config.num_layers)}}


def _listed(keys: list[str]) -> str:
    more = f", … ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


def _load_strict(model: Model, sd: Mapping[str, Tensor], source: Path) -> Model:
    """Load ``sd`` into a meta-built ``model`` (fp32, CPU), reporting every mismatch at once."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(own[k].shape)})"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    problems = [
        f"{len(missing)} missing keys ({_listed(missing)})" if missing else "",
        f"{len(unexpected)} unexpected keys ({_listed(unexpected)})" if unexpected else "",
        f"{len(shapes)} mis-shaped keys ({_listed(shapes)})" if shapes else "",
    ]
    if any(problems):
        raise CheckpointError(
            f"{source}: does not fit {type(model).__name__} built from its config.json: "
            + "; ".join(p for p in problems if p)
            + ". Is config.json the one these weights were saved with?"
        )
    weights = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def load_pretrained_dit(directory: str | Path) -> ColaDiT:
    """Load an official (or :func:`save_pretrained_dit`) ``ColaDiTModel`` directory.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``.

    Returns:
        The DiT on CPU with fp32 parameters, in eval mode.

    Raises:
        CheckpointError: a file, shard or key is missing, a key is unexpected or mis-shaped, or config.json
            is invalid.
    """
    directory = Path(directory)
    config = read_dit_config(directory)
    sd = dit_from_official(read_state_dict(directory), config)
    with torch.device("meta"):
        model = ColaDiT(config)
    return _load_strict(model, sd, directory).eval()


def load_pretrained_vae(directory: str | Path) -> ColaTextVAE:
    """Load an official (or :func:`save_pretrained_vae`) ``ColaTextVAEModel`` directory.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` (or a sharded index).

    Returns:
        The VAE on CPU with fp32 parameters, in eval mode.

    Raises:
        CheckpointError: a file or key is missing, a key is unexpected or mis-shaped, or config.json is invalid.
    """
    directory = Path(directory)
    config = read_vae_config(directory)
    with torch.device("meta"):
        model = ColaTextVAE(config)
    return _load_strict(model, read_state_dict(directory), directory).eval()


def save_official(
    sd: Mapping[str, Tensor],
    config: ColaDitConfig | ColaVaeConfig,
    directory: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write ``config.json`` and the weights (fp32) of an official-layout directory.

    Args:
        sd: official keys (a DiT's already through :func:`dit_to_official`); tensors on any device and dtype.
        config: the network's config, written with the HF bookkeeping keys and ``torch_dtype`` float32.
        directory: created if missing; earlier weight files there are replaced.
        max_shard_bytes: above it the weights are shards plus ``model.safetensors.index.json``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = {**config.to_hf_dict(), "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in sd.items()}
    write_weights(directory, tensors, max_shard_bytes=max_shard_bytes)


def save_pretrained_dit(model: ColaDiT, directory: str | Path) -> None:
    """Write ``config.json`` and the weights (fp32, official keys incl. ``rope.freqs``, sharded above 5 GB)."""
    save_official(dit_to_official(model.state_dict(), model.config), model.config, directory)


def save_pretrained_vae(model: ColaTextVAE, directory: str | Path) -> None:
    """Write ``config.json`` and the weights (fp32, official keys, sharded above 5 GB) to ``directory``."""
    save_official(model.state_dict(), model.config, directory)
