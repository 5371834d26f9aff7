"""Data on `datasets`: sources, tokenisation and packing."""
