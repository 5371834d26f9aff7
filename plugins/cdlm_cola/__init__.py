"""Cola DLM (arXiv 2605.06548) as a cdlm plugin."""
