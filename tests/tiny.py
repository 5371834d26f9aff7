"""Overrides shared by tests that train ``elf-tiny`` on a few rows of text."""

SMALL_BPE = ["data.vocab_size=512", "model.vocab_size=512", "model.encoder.vocab_size=513"]
"""A 512-token BPE (513 encoder ids: [MASK]): the recipe's 4096 tokens need more text than a test's few rows."""
