"""Typed exceptions. Every user-facing failure is one of these; the CLI prints one line and exits 2.

The API raises them; nothing in mbconvert should let a raw KeyError/RuntimeError escape for bad input.
"""


class MbconvertError(Exception):
    """Base class: bad input or an unsupported request. The CLI maps it to exit code 2."""

    exit_code = 2


class CorruptFileError(MbconvertError):
    """A file is missing, truncated, or not in the format its name claims."""


class UnsafeFileError(MbconvertError):
    """A pickle that needs code execution to load (refused: we only load with weights_only=True)."""


class UnknownArchitectureError(MbconvertError):
    """The weight names match no source family in mbconvert.adapters."""


class ShapeMismatchError(MbconvertError):
    """Tensor shapes disagree with each other, with the config, or with the tokenizer."""


class NonFiniteWeightsError(MbconvertError):
    """A weight tensor holds NaN or Inf."""


class TokenizerError(MbconvertError):
    """No tokenizer could be found, or it does not fit the model."""


class DataError(MbconvertError):
    """A dataset file is empty, malformed, or its labels do not fit the model."""


class ConfigError(MbconvertError):
    """An option value is impossible (e.g. a bottleneck larger than the hidden size)."""


class MissingDependencyError(MbconvertError):
    """An optional extra is not installed (e.g. `pip install mbconvert[export]`)."""


class TrainingDivergedError(MbconvertError):
    """Training produced a non-finite loss or weights (e.g. a learning rate far too high); nothing is saved."""


class OutputError(MbconvertError, OSError):
    """The output cannot be written: it is (or holds) an input, holds files mbconvert did not write, or the OS
    refused (read-only, full disk, a file where a folder should be). Also an OSError, so `except OSError` still
    catches it where a failed write is tolerable (e.g. a cache entry)."""
