"""Errors raised on bad user input: each says what failed, where, what was expected and what was found."""

from __future__ import annotations


class CdlmError(Exception):
    """Base class of every error cdlm raises on user input; the CLI prints it and exits with code 2."""


class RecipeError(CdlmError, ValueError):
    """A recipe file, a `--set` override or a config value is invalid."""


class CheckpointError(CdlmError, FileNotFoundError):
    """A checkpoint is missing, incomplete, or does not fit the model."""


class PluginError(CdlmError, LookupError):
    """A method plugin is not installed or does not honour the plugin contract."""


class DataError(CdlmError, ValueError):
    """A dataset, a tokenizer or an input (prompt, batch) cannot be used."""


class TrainingError(CdlmError, RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the message names the step and the last checkpoint."""


class DeviceError(CdlmError, ValueError):
    """A device was asked for that this machine does not have."""


class OutputError(CdlmError, ValueError):
    """An output path (a run directory, a samples file) cannot be written."""
