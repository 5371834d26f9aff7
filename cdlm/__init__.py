"""cdlm: continuous diffusion language models."""
