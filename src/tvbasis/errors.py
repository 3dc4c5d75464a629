"""Typed errors. Library code raises these; the CLI turns each into one clear line and a non-zero exit."""

from __future__ import annotations


class TvbasisError(Exception):
    """Base class of every error tvbasis raises on bad input."""

    exit_code = 2


class CheckpointError(TvbasisError):
    """A checkpoint cannot be found, opened or parsed (missing path, corrupt file, unsafe pickle)."""


class TensorMismatchError(TvbasisError):
    """Two checkpoints that must share tensors do not (missing/extra names, shape or dtype mismatch)."""


class NonFiniteError(TvbasisError):
    """An input tensor holds NaN or Inf."""


class OutputExistsError(TvbasisError):
    """The output path exists and --force was not given."""


class ConfigError(TvbasisError):
    """Invalid parameters (unknown method, density out of range, M >= T, ...)."""


class StoreError(TvbasisError):
    """A basis store is malformed, of an unsupported format version, or does not match its pretrained model."""


class UnknownTaskError(TvbasisError):
    """A task name that the store or benchmark does not know."""
