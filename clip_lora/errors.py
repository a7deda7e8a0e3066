"""Typed errors for bad files and failed runs.

Each message is one line that names the file (or run folder), says what is wrong and
what to do; the CLI prints it as is, without a traceback (``--debug`` shows one).  The
file errors are ``ValueError``s as well, so code that caught ValueError keeps working.
"""

from __future__ import annotations


class ClipLoRAError(Exception):
    """Base class: a one-line message meant for the user."""


class AdapterFileError(ClipLoRAError, ValueError):
    """An adapter file is missing, unreadable, malformed, or does not fit the model."""


class ModelMismatchError(AdapterFileError):
    """An adapter was saved for another model (its tower signature differs)."""


class PretrainedError(ClipLoRAError, ValueError):
    """``pretrained`` names weights that cannot be loaded into the model."""


class CheckpointError(ClipLoRAError, ValueError):
    """A run folder's ``checkpoint.pt`` is truncated, corrupt or from another run."""


class DivergenceError(ClipLoRAError, RuntimeError):
    """Training produced a non-finite loss or non-finite adapter weights."""


class RunLockedError(ClipLoRAError, RuntimeError):
    """Another process is writing to the same run folder."""


def reason(exc: BaseException) -> str:
    """The first line of an exception's message, prefixed with its type: for wrapping
    a library's error (often multi-line) into one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
