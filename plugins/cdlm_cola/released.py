"""The official Cola release layout, read as it is and written back (Cola spec §1.1).

::

    hf_models/cola_dlm/cola_dit/   config.json + model.safetensors, or shards + model.safetensors.index.json
    hf_models/cola_dlm/cola_vae/   config.json + model.safetensors
    hf_models/tokenizer.json       the HF ``tokenizers`` JSON (OLMo 2 for the release)

Either ``hf_models/`` or ``hf_models/cola_dlm/`` (or a hub snapshot of such a tree) is accepted. The layout holds
no training recipe: :meth:`ColaOfficialRelease.read` starts from ``cola-2b`` and takes the network shapes from
the two ``config.json`` files and the token ids from the tokenizer (:func:`_token_ids`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from tokenizers import Tokenizer
from torch import Tensor

from cdlm.errors import CheckpointError
from cdlm.interfaces import ReleasedCheckpoint, ReleasedFormat
from cdlm.recipes import read_with_extends, resolve
from cdlm.shards import DEFAULT_SHARD_BYTES
from cdlm_cola.config import ColaConfig, ColaDitConfig, ColaVaeConfig, read_dit_config, read_vae_config
from cdlm_cola.state_dict import dit_to_official, load_pretrained_dit, load_pretrained_vae, save_official

logger = logging.getLogger(__name__)

BASE_RECIPE = "cola-2b"
RELEASE_DIR = "cola_dlm"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_NAMES = {"pad_id": "<|pad|>", "eos_id": "<|endoftext|>", "im_end_id": "<|im_end|>"}
"""``model.*`` token-id fields and the OLMo 2 tokens that hold them (spec §8.1; the fixture tokenizer's too)."""


def _root(path: Path) -> Path | None:
    """Return the folder holding ``cola_dit/`` and ``cola_vae/`` (``path`` or ``path/cola_dlm``), if any."""
    for root in (path, path / RELEASE_DIR):
        if (root / "cola_dit" / "config.json").is_file() and (root / "cola_vae" / "config.json").is_file():
            return root
    return None


def _find_tokenizer(path: Path, root: Path) -> Path:
    """Return the release's ``tokenizer.json``: in ``path``, next to the two folders, or in ``cola_dlm/``'s parent.

    Raises:
        CheckpointError: none of these places has one (each is listed).
    """
    places = [path, root, *([root.parent] if root.name == RELEASE_DIR else [])]
    candidates = list(dict.fromkeys(place / TOKENIZER_FILE for place in places))
    for candidate in candidates:
        if candidate.is_file():
            return candidate  # not resolved: a hub snapshot links it to a blob without the .json suffix
    raise CheckpointError(
        f"{path}: no {TOKENIZER_FILE} for this Cola release; looked for {', '.join(map(str, candidates))} "
        f"(spec §1.1 puts it at hf_models/{TOKENIZER_FILE}); copy the tokenizer there"
    )


def _token_ids(tokenizer: Path, base: Mapping[str, Any], vocab_size: int) -> dict[str, int | None]:
    """Return ``pad_id`` / ``eos_id`` / ``im_end_id`` for a release whose tokenizer is ``tokenizer``.

    An id is the tokenizer's id of its :data:`TOKEN_NAMES` token (100277 / 100257 / 100265 for OLMo 2, the
    ``cola-2b`` values). A token the tokenizer lacks keeps ``base``'s (``cola-2b``'s) id when that is inside the
    VAE vocabulary; otherwise ``im_end_id`` becomes None (no chat stop) and ``pad_id`` / ``eos_id`` stay, so
    that the build names them as outside the vocabulary and ``--set model.pad_id=ID`` fixes them.

    Raises:
        CheckpointError: ``tokenizer`` is not a ``tokenizers`` JSON file.
    """
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as err:  # the tokenizers library raises a bare Exception for a bad file
        raise CheckpointError(f"{tokenizer}: not a tokenizers JSON file ({err})") from None
    ids: dict[str, int | None] = {}
    for field, token in TOKEN_NAMES.items():
        found, default = tok.token_to_id(token), base.get(field)
        if found is None:
            in_vocab = default is not None and default < vocab_size
            found = default if in_vocab or field != "im_end_id" else None
            logger.info("%s: no %s token; model.%s=%s", tokenizer, token, field, found)
        ids[field] = found
    return ids


def _weights_config(model: ColaConfig, kind: str) -> ColaDitConfig | ColaVaeConfig:
    """Return the config the ``kind`` network was built with: its pretrained ``config.json`` wins, as in build."""
    directory = getattr(model, f"pretrained_{kind}")
    if directory is not None:
        return read_dit_config(directory) if kind == "dit" else read_vae_config(directory)
    inline = getattr(model, kind)
    assert inline is not None, f"model.{kind}: a built method has shapes or a directory"
    return inline


class ColaOfficialRelease(ReleasedFormat):
    """The ``hf_models/`` tree of the Cola release: DiT, VAE and tokenizer, no recipe, one set of weights."""

    name: ClassVar[str] = "cola-official"

    def detect(self, path: Path) -> bool:
        """Return whether ``path`` or ``path/cola_dlm`` holds ``cola_dit/config.json`` and ``cola_vae/config.json``."""
        return _root(Path(path)) is not None

    def read(self, path: Path) -> ReleasedCheckpoint:
        """Read a release tree as a ``cola-2b``-based recipe with the release's shapes and tokenizer, and its weights.

        The recipe is ``cola-2b`` with ``model.dit`` / ``model.vae`` replaced by every field of the two
        ``config.json`` files (so any size builds; the DiT's ``sft_*`` fields included), no ``pretrained_*``
        directory, ``data.tokenizer`` the tree's ``tokenizer.json`` and the token ids of :func:`_token_ids`.
        The weights are keyed ``dit.*`` (without the reference's ``rope.freqs`` buffers, checked) and ``vae.*``;
        ``ref_vae.*`` is absent (the build copies the VAE into it). No EMA, no step.

        Raises:
            CheckpointError: not a release tree, no tokenizer, a broken ``config.json`` or weights that do not fit
                it (each names the file).
        """
        path = Path(path)
        root = _root(path)
        if root is None:
            raise CheckpointError(
                f"{path}: not a Cola release: expected cola_dit/config.json and cola_vae/config.json in it or in "
                f"{path / RELEASE_DIR}"
            )
        tokenizer = _find_tokenizer(path, root)
        dit_config, vae_config = read_dit_config(root / "cola_dit"), read_vae_config(root / "cola_vae")
        recipe = read_with_extends(resolve(BASE_RECIPE))
        base = {k: v for k, v in recipe["model"].items() if not k.startswith("pretrained_")}
        ids = _token_ids(tokenizer, base, vae_config.vocab_size)
        recipe["description"] = f"Cola release read from {path} ({self.name})"
        recipe["model"] = {**base, "dit": dit_config.model_dump(), "vae": vae_config.model_dump(), **ids}
        recipe["data"] = {**recipe.get("data", {}), "tokenizer": str(tokenizer.absolute())}
        dit, vae = load_pretrained_dit(root / "cola_dit"), load_pretrained_vae(root / "cola_vae")
        weights = {f"vae.{k}": v for k, v in vae.state_dict().items()}
        weights.update({f"dit.{k}": v for k, v in dit.state_dict().items()})
        return ReleasedCheckpoint(recipe=recipe, weights=weights)

    def write(
        self,
        directory: Path,
        *,
        config: Any,
        weights: Mapping[str, Tensor],
        ema: Mapping[str, Tensor] | None,
        step: int,
        tokenizer: Any,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> Path:
        """Write ``directory/cola_dlm/{cola_dit,cola_vae}/`` and ``directory/tokenizer.json`` (fp32).

        The release ships one set of weights: the EMA shadows where ``ema`` has them, the raw weights elsewhere.
        ``ref_vae.*`` is not written (it is a copy of the VAE) and neither is ``step`` (the layout has no place
        for it). Network configs come from ``config.model`` (a ``pretrained_*`` directory's ``config.json`` wins).

        Args:
            directory: the ``hf_models/`` folder; created if missing, earlier weight files there are replaced.
            config: the run's validated :class:`cdlm.config.RunConfig`.
            weights: ``Method.modules()`` state dict (``vae.*``, ``dit.*``, ``ref_vae.*``).
            ema: EMA shadows for some of ``weights``' keys, or None.
            step: training step; not recorded.
            tokenizer: the run's ``PreTrainedTokenizerFast``; its backend ``tokenizers`` JSON is written.
            max_shard_bytes: each network's weights are split into shards above it (the release DiT: two).

        Returns:
            ``directory``, which :meth:`read` takes.

        Raises:
            CheckpointError: the tokenizer is not a fast tokenizer, so it has no ``tokenizer.json`` form.
        """
        directory = Path(directory)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise CheckpointError(
                f"{directory / TOKENIZER_FILE}: cannot write it: the run's tokenizer ({type(tokenizer).__name__}) "
                "is not a fast tokenizer; the Cola release ships a tokenizers JSON"
            )
        chosen = {k: v if ema is None else ema.get(k, v) for k, v in weights.items()}
        for kind in ("dit", "vae"):
            net_config = _weights_config(config.model, kind)
            sd = {k.removeprefix(f"{kind}."): v for k, v in chosen.items() if k.startswith(f"{kind}.")}
            if isinstance(net_config, ColaDitConfig):
                sd = dit_to_official(sd, net_config)
            save_official(sd, net_config, directory / RELEASE_DIR / f"cola_{kind}", max_shard_bytes=max_shard_bytes)
        backend.save(str(directory / TOKENIZER_FILE))
        return directory
