"""Official ``lillian039/ELF`` (pytorch_elf) state dicts ↔ our :class:`~cdlm_elf.model.ElfTransformer` (spec §1.5).

One key-template table drives both directions. Official checkpoints (``checkpoint_<N>``: ``params`` and
``ema_params1``, spec §1.6) hold the same 23 + 12·depth keys; reading the file is the caller's job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar

from torch import Tensor

from cdlm.errors import CheckpointError
from cdlm.interfaces import StateDictAdapter
from cdlm_elf.config import ElfConfig

Transform = Callable[[Tensor], Tensor]


def _same(x: Tensor) -> Tensor:
    return x


def _transpose(x: Tensor) -> Tensor:
    return x.t().contiguous()  # official bare kernels are (in, out); nn.Linear weights are (out, in)


SAME: Transform = _same
TRANSPOSE: Transform = _transpose  # its own inverse, so the one table serves both directions
PREFIX = "network."  # the Method holds the network as trainable["network"]
MAX_LISTED = 8


class ElfStateDictAdapter(StateDictAdapter):
    """Map the official ELF state-dict layout to ours (keys under ``network.``) and back; pure dict → dict.

    Args:
        cfg: the model config; its ``depth`` fixes the expected block keys.
    """

    name: ClassVar[str] = "lillian039/ELF"
    # official key → (our key without PREFIX, transform); {i} = block index. Every key of spec §1.5.
    TABLE: ClassVar[dict[str, tuple[str, Transform]]] = {
        "t_emb_tokens": ("time_tokens", SAME),
        "self_cond_cfg_tokens": ("sc_tokens", SAME),
        "mode_tokens": ("mode_tokens", SAME),
        "proj_kernel": ("decoder_head.proj.weight", TRANSPOSE),
        "proj_bias": ("decoder_head.proj.bias", SAME),
        "unembed_kernel": ("decoder_head.unembed.weight", TRANSPOSE),
        "unembed_bias": ("decoder_head.unembed.bias", SAME),
        "self_cond_proj.weight": ("self_cond_proj.weight", SAME),
        "self_cond_proj.bias": ("self_cond_proj.bias", SAME),
        "text_proj.proj1.weight": ("text_proj.0.weight", SAME),
        "text_proj.proj2.weight": ("text_proj.1.weight", SAME),
        "text_proj.proj2.bias": ("text_proj.1.bias", SAME),
        "t_embedder.mlp_0.weight": ("time_embedder.mlp.0.weight", SAME),
        "t_embedder.mlp_0.bias": ("time_embedder.mlp.0.bias", SAME),
        "t_embedder.mlp_2.weight": ("time_embedder.mlp.2.weight", SAME),
        "t_embedder.mlp_2.bias": ("time_embedder.mlp.2.bias", SAME),
        "self_cond_cfg_embedder.mlp_0.weight": ("sc_embedder.mlp.0.weight", SAME),
        "self_cond_cfg_embedder.mlp_0.bias": ("sc_embedder.mlp.0.bias", SAME),
        "self_cond_cfg_embedder.mlp_2.weight": ("sc_embedder.mlp.2.weight", SAME),
        "self_cond_cfg_embedder.mlp_2.bias": ("sc_embedder.mlp.2.bias", SAME),
        "blocks.{i}.norm1.weight": ("blocks.{i}.norm1.weight", SAME),
        "blocks.{i}.attn.qkv.weight": ("blocks.{i}.attn.qkv.weight", SAME),
        "blocks.{i}.attn.qkv.bias": ("blocks.{i}.attn.qkv.bias", SAME),
        "blocks.{i}.attn.q_norm.weight": ("blocks.{i}.attn.q_norm.weight", SAME),
        "blocks.{i}.attn.k_norm.weight": ("blocks.{i}.attn.k_norm.weight", SAME),
        "blocks.{i}.attn.proj.weight": ("blocks.{i}.attn.proj.weight", SAME),
        "blocks.{i}.attn.proj.bias": ("blocks.{i}.attn.proj.bias", SAME),
        "blocks.{i}.norm2.weight": ("blocks.{i}.norm2.weight", SAME),
        "blocks.{i}.mlp.w12.weight": ("blocks.{i}.mlp.w12.weight", SAME),
        "blocks.{i}.mlp.w12.bias": ("blocks.{i}.mlp.w12.bias", SAME),
        "blocks.{i}.mlp.w3.weight": ("blocks.{i}.mlp.w3.weight", SAME),
        "blocks.{i}.mlp.w3.bias": ("blocks.{i}.mlp.w3.bias", SAME),
        "final_layer.norm_final.weight": ("flow_head.norm.weight", SAME),
        "final_layer.linear.weight": ("flow_head.linear.weight", SAME),
        "final_layer.linear.bias": ("flow_head.linear.bias", SAME),
    }

    def __init__(self, cfg: ElfConfig) -> None:
        self.depth = cfg.depth
        self._to_ours: dict[str, tuple[str, Transform]] = {}
        for official, (ours, transform) in self.TABLE.items():
            for i in range(self.depth) if "{i}" in official else [None]:
                self._to_ours[official.format(i=i)] = (PREFIX + ours.format(i=i), transform)
        self._to_official = {ours: (official, t) for official, (ours, t) in self._to_ours.items()}

    def from_official(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return our state dict (keys ``network.…``) for an official ELF state dict (``params`` / ``ema_params1``).

        Raises:
            CheckpointError: keys are missing or unknown (e.g. the checkpoint has another depth).
        """
        self._check(sd, self._to_ours, "official ELF state dict")
        return {ours: transform(sd[official]) for official, (ours, transform) in self._to_ours.items()}

    def to_official(self, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Return the official layout for our state dict (keys ``network.…``); inverse of :meth:`from_official`.

        Raises:
            CheckpointError: keys are missing or unknown.
        """
        self._check(sd, self._to_official, "cdlm ELF state dict")
        return {official: transform(sd[ours]) for ours, (official, transform) in self._to_official.items()}

    def _check(self, sd: Mapping[str, Tensor], expected: Mapping[str, object], what: str) -> None:
        missing = [k for k in expected if k not in sd]
        unknown = [k for k in sd if k not in expected]
        if missing or unknown:
            raise CheckpointError(
                f"{what}: {len(missing)} missing key(s) ({_listed(missing)}), {len(unknown)} unknown key(s) "
                f"({_listed(unknown)}); expected the {len(expected)} keys of ElfTransformer(depth={self.depth}) "
                "(spec §1.5). Saved with another model config?"
            )


def _listed(keys: Iterable[str]) -> str:
    keys = list(keys)
    return ", ".join(keys[:MAX_LISTED]) + (", …" if len(keys) > MAX_LISTED else "") if keys else "none"
