"""Training: the one Accelerate loop, EMA, optimisers and checkpoints."""
