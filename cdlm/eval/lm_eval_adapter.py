"""The ``cdlm`` model of lm-evaluation-harness: its ``generate_until`` tasks on any cdlm checkpoint.

Importing this module registers the model under the name ``cdlm``. lm-eval finds models by import, not by entry
point, so the command line goes through :func:`main` (the ``cdlm-lm-eval`` script), which registers it and then
runs lm-eval's own CLI::

    cdlm-lm-eval --model cdlm --model_args checkpoint=runs/elf-tiny,steps=16 --tasks TASK --include_path DIR

Each request's context is a prompt (a condition for ELF, a prefix to continue for Cola); the generation is cut at
the first of the task's ``until`` strings. Log-likelihood requests are refused: these models give no exact
likelihood of a continuation.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from cdlm.api import load_pretrained, sample
from cdlm.errors import DataError


def cut_at(text: str, until: list[str]) -> str:
    """Return ``text`` up to the first occurrence of any of the ``until`` strings."""
    cut = min((i for i in (text.find(u) for u in until if u) if i >= 0), default=len(text))
    return text[:cut]


@register_model("cdlm")
class CdlmLM(LM):
    """A cdlm model behind lm-eval's :class:`~lm_eval.api.model.LM` interface (``generate_until`` only).

    Args:
        checkpoint: anything :func:`cdlm.load_pretrained` reads.
        steps: solver steps (``sample.steps``); default the model's.
        seed: sampling seed (``sample.seed``); default the model's.
        device: where the model runs; default CUDA when available.
    """

    def __init__(
        self, checkpoint: str, steps: int | None = None, seed: int | None = None, device: str | None = None, **_: Any
    ) -> None:
        super().__init__()
        overrides = [f"sample.{k}={v}" for k, v in (("steps", steps), ("seed", seed)) if v is not None]
        self.model = load_pretrained(str(checkpoint), overrides=overrides, device=device)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generate for each request's context, batched by generation settings, cut at its ``until`` strings.

        A request's ``max_gen_toks`` sets ``sample.max_new_tokens`` for a method that has that setting (Cola);
        one that generates whole rows (ELF) ignores it.
        """
        settings = self.model.config.sample
        budget = getattr(settings, "max_new_tokens", None)  # None: the method generates whole rows (ELF)
        groups: dict[int | None, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[None if budget is None else int(request.args[1].get("max_gen_toks", budget))].append(i)
        out = [""] * len(requests)
        for max_tokens, indices in groups.items():
            samples = sample(
                self.model,
                prompts=[requests[i].args[0] for i in indices],
                overrides=[] if max_tokens is None else [f"sample.max_new_tokens={max_tokens}"],
            )
            for i, s in zip(indices, samples, strict=True):
                until = requests[i].args[1].get("until") or []
                out[i] = cut_at(s.text, [until] if isinstance(until, str) else list(until))
        return out

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Refuse: continuous diffusion models here give no exact log-likelihood (use generate_until tasks)."""
        raise DataError("lm-eval model cdlm: loglikelihood tasks are not supported; choose generate_until tasks")

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Refuse, as :meth:`loglikelihood`."""
        raise DataError("lm-eval model cdlm: loglikelihood_rolling tasks are not supported; choose generate_until")


def main() -> None:
    """Run lm-eval's command line with the ``cdlm`` model registered (the ``cdlm-lm-eval`` script)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
