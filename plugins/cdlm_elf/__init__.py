"""ELF (Embedded Language Flows, arXiv 2605.10938) as a cdlm plugin."""
