"""Cola DLM (arXiv 2605.06548) as a cdlm plugin.

A text VAE maps tokens to latents; a block-causal DiT is a flow-matching prior over them, sampled block by
block with repaint and classifier-free guidance. Spec: ``shared/specs/cola.md``.

Module keys are ``vae``, ``dit`` and ``ref_vae`` in every stage, so a checkpoint of one stage initialises the
next (``train.init_from`` loads strictly). By ``model.stage``:

========  ===============  ======================
stage     trainable        frozen
========  ===============  ======================
vae       vae              dit, ref_vae
joint     vae, dit         ref_vae
dit       dit              vae, ref_vae
========  ===============  ======================

With ``model.distill`` set the DiT alone is trained, whatever the stage, as a few-step student of a frozen
teacher's per-block transport (:mod:`cdlm_cola.distill`).

``ref_vae`` is Stage 2's reference encoder ``q_φref`` (:class:`~cdlm_cola.components.ReferenceVAE`): it takes
the VAE's weights when joint training starts (the joint objective anchors it before its first loss, after
``train.init_from`` is loaded) and keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from cdlm.config import RunConfig
from cdlm.errors import RecipeError
from cdlm.interfaces import Method, MethodSpec
from cdlm.training.distill import Teacher
from cdlm_cola.components import ColaDecoder, ColaDenoiser, ColaEmbedder, ReferenceVAE
from cdlm_cola.config import (
    ColaConfig,
    ColaDitConfig,
    ColaSampleConfig,
    ColaVaeConfig,
    check_run,
    read_dit_config,
    read_vae_config,
)
from cdlm_cola.distill import ColaDistillObjective
from cdlm_cola.dit import ColaDiT
from cdlm_cola.generate import ColaPipeline
from cdlm_cola.objective import objective_for
from cdlm_cola.released import ColaOfficialRelease
from cdlm_cola.schedule import ColaSchedule
from cdlm_cola.state_dict import load_pretrained_dit, load_pretrained_vae
from cdlm_cola.vae import ColaTextVAE

logger = logging.getLogger(__name__)


def build(config: RunConfig) -> Method:
    """Build Cola from a run config: the VAE and DiT (random init or official weights), objective and pipeline.

    Shapes come from ``model.vae`` / ``model.dit``, or from ``config.json`` in ``model.pretrained_vae`` /
    ``model.pretrained_dit``, whose weights are then loaded: there ``config.json`` wins (a recipe field that
    differs is logged) and the recipe's shapes, if given, must build the same parameters. Random
    weights are drawn from ``torch.Generator().manual_seed(config.seed)``, the VAE first. On the meta device
    (parameter counting) nothing is loaded, and no file is read when the shapes are inline.

    Raises:
        RecipeError: a network has neither shapes nor a directory, the recipe's shapes contradict ``config.json``,
            the DiT's input width is not the VAE's latent width, or a token id is outside the vocabulary.
        CheckpointError: a pretrained directory is missing, invalid or does not fit its ``config.json``.
    """
    cfg: ColaConfig = config.model
    generator = torch.Generator().manual_seed(config.seed)
    meta = torch.empty(0).device.type == "meta"
    vae = _network(cfg.vae, cfg.pretrained_vae, "vae", meta, generator)
    dit = _network(cfg.dit, cfg.pretrained_dit, "dit", meta, generator)
    assert isinstance(vae, ColaTextVAE) and isinstance(dit, ColaDiT)
    _check(cfg, vae.config, dit.config)
    ref_vae = ReferenceVAE(vae)
    schedule = ColaSchedule(cfg)
    embedder, denoiser, decoder = ColaEmbedder(vae), ColaDenoiser(dit, schedule), ColaDecoder(vae)
    modules: dict[str, nn.Module] = {"vae": vae, "dit": dit, "ref_vae": ref_vae}
    if cfg.distill is None:
        objective = objective_for(cfg, vae, dit, ref_vae, schedule)
        trained = {"vae": ("vae",), "joint": ("vae", "dit"), "dit": ("dit",)}[cfg.stage]
    else:  # a few-step student of the per-block transport; the teacher is read on first use
        objective = ColaDistillObjective(embedder, denoiser, schedule, Teacher(cfg.distill), cfg.distill)
        trained = ("dit",)
    return Method(
        embedder=embedder,
        denoiser=denoiser,
        schedule=schedule,
        discretizer=decoder,
        objective=objective,
        pipeline=ColaPipeline(cfg, embedder=embedder, denoiser=denoiser, schedule=schedule, decoder=decoder),
        vocab_size=vae.config.vocab_size,
        trainable={k: m for k, m in modules.items() if k in trained},
        frozen={k: m for k, m in modules.items() if k not in trained},
    )


_KINDS = {
    "vae": (ColaTextVAE, read_vae_config, load_pretrained_vae),
    "dit": (ColaDiT, read_dit_config, load_pretrained_dit),
}


def _network(
    inline: ColaVaeConfig | ColaDitConfig | None,
    directory: str | None,
    kind: str,
    meta: bool,
    generator: torch.Generator,
) -> nn.Module:
    """Build the ``kind`` network: random from ``inline`` shapes, or loaded from ``directory``."""
    cls, read_config, load = _KINDS[kind]
    if directory is None:
        if inline is None:
            raise RecipeError(
                f"model.{kind}: give the network's shapes (model.{kind}: {{...}}) or an official checkpoint "
                f"directory (model.pretrained_{kind}: DIR)"
            )
        return cls(inline, generator)
    if meta and inline is not None:
        return cls(inline)  # counting parameters: the inline shapes suffice, nothing is read
    found = read_config(directory)
    if inline is not None:
        _check_agrees(inline, found, cls, f"model.pretrained_{kind}={directory!r}", f"model.{kind}")
    return cls(found) if meta else load(directory)


def _check_agrees(
    inline: BaseModel, found: BaseModel, cls: Callable[[Any], nn.Module], source: str, field: str
) -> None:
    """Check a recipe's inline network config against a checkpoint's ``config.json``, which wins.

    Raises:
        RecipeError: the two build different parameter shapes (the weights could not load).
    """
    differs = [f for f in type(inline).model_fields if getattr(inline, f) != getattr(found, f)]
    if not differs:
        return
    listed = ", ".join(f"{field}.{f}: {getattr(inline, f)!r} vs {getattr(found, f)!r}" for f in differs)
    with torch.device("meta"):
        shapes = [{k: v.shape for k, v in cls(c).state_dict().items()} for c in (inline, found)]
    if shapes[0] != shapes[1]:
        raise RecipeError(
            f"{source}: its config.json builds other parameter shapes than the recipe ({listed}); fix {field} "
            "or drop it to take every field from config.json"
        )
    logger.warning("%s: config.json differs from the recipe (%s); using config.json", source, listed)


def _check(cfg: ColaConfig, vae: ColaVaeConfig, dit: ColaDitConfig) -> None:
    """Check that the two networks fit together and that the token ids are in the VAE's vocabulary."""
    if dit.txt_in_channels != vae.latent_dim or dit.txt_out_channels != vae.latent_dim:
        raise RecipeError(
            f"model.dit.txt_in_channels / txt_out_channels ({dit.txt_in_channels} / {dit.txt_out_channels}) must "
            f"equal model.vae.latent_dim ({vae.latent_dim}): the DiT models the VAE's latents"
        )
    for name in ("pad_id", "eos_id", "im_end_id"):
        value = getattr(cfg, name)
        if value is not None and value >= vae.vocab_size:
            raise RecipeError(
                f"model.{name}={value} is outside the VAE vocabulary [0, {vae.vocab_size}); set it to the "
                "tokenizer's id (the defaults are OLMo 2's)"
            )


spec = MethodSpec(
    name="cola",
    description="Cola DLM: a text VAE and a block-causal flow-matching DiT prior over its latents",
    config_cls=ColaConfig,
    build=build,
    released_formats=(ColaOfficialRelease(),),
    check=check_run,
    sample_config_cls=ColaSampleConfig,
)
