"""Evaluation: the metrics both papers report, computed as their reference code computes them.

One module per job: :mod:`~cdlm.eval.gen_ppl` (generative perplexity under a causal-LM judge),
:mod:`~cdlm.eval.entropy` (unigram entropy), :mod:`~cdlm.eval.text_metrics` (BLEU, ROUGE, MAUVE),
:mod:`~cdlm.eval.cola_prompts` and :mod:`~cdlm.eval.cola_scoring` (Cola's 8-task generative benchmark),
:mod:`~cdlm.eval.generate` (sampling with NFE and timing), :mod:`~cdlm.eval.record` (what a rerun needs),
:mod:`~cdlm.eval.runner` (``cdlm eval``), :mod:`~cdlm.eval.sweep` (steps versus quality) and
:mod:`~cdlm.eval.lm_eval_adapter` (the ``cdlm`` model of lm-evaluation-harness).
"""
