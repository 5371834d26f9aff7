"""Sampling flags of ``cdlm sample`` and ``cdlm eval``: sugar for ``--set sample.FIELD=VALUE``.

A flag sets one field of the method's ``sample:`` section (``MethodSpec.sample_config_cls``). A flag whose field
the loaded method does not declare is refused, naming the method and the flags it takes; every other problem is
the recipe validator's, shown with the flag as typed instead of its ``--set`` form.
"""

from __future__ import annotations

from collections.abc import Mapping

from cdlm.config import RunConfig
from cdlm.errors import DataError

SAMPLE_FLAGS = {
    "num_samples": "--num-samples",
    "steps": "--steps",
    "sampler": "--sampler",
    "guidance": "--guidance",
    "seed": "--seed",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "repetition_penalty": "--repetition-penalty",
    "use_ema": "--ema/--raw-weights",
}
"""Field of the ``sample:`` section → the flag that sets it."""


def overrides(given: Mapping[str, object], typed: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return ``{"sample.FIELD=VALUE": "--flag as typed"}`` for the flags given (their value not None).

    Args:
        given: field → the flag's value (None: the flag was not given).
        typed: field → the value as the user typed it, where it differs from the value set (``--sampler ode``).
    """
    shown = dict(typed or {})
    return {
        f"sample.{field}={value}": f"{SAMPLE_FLAGS[field]} {shown.get(field, value)}".strip()
        for field, value in given.items()
        if value is not None
    }


def check_used(config: RunConfig, flags: Mapping[str, str], offered: tuple[str, ...]) -> None:
    """Refuse the flags whose field the method of ``config`` does not declare.

    Args:
        config: the loaded model's config (its ``sample`` is the method's class).
        flags: the ``overrides`` mapping of the flags given.
        offered: the fields the command has flags for, to list the ones the method takes.

    Raises:
        DataError: a flag the method does not use, e.g. ``--max-new-tokens`` for ELF, which generates whole rows.
    """
    fields = type(config.sample).model_fields
    unused = [flag for override, flag in flags.items() if override[len("sample.") :].partition("=")[0] not in fields]
    if unused:
        takes = ", ".join(SAMPLE_FLAGS[f] for f in offered if f in fields)
        raise DataError(
            f"{', '.join(unused)}: method {config.method!r} does not use {'this flag' if len(unused) == 1 else 'these'}"
            f"; the sampling flags it takes are {takes} (cdlm recipes show RECIPE lists all its sample settings; "
            "set any with --set sample.FIELD=VALUE)"
        )


def in_flag_terms(message: str, flags: Mapping[str, str]) -> str:
    """Name the flag the user typed (``--num-samples 0``), not its ``--set sample.num_samples=0`` form."""
    for override, flag in flags.items():
        message = message.replace(f"--set {override}", flag)
    return message
