"""The exceptions fusedmoe raises on purpose, in one place.

Every one names the argument, file or field at fault, what it got and what it
expects. Plain ``ValueError``/``TypeError`` are used for bad arguments to a
function; these classes mark the two kinds a caller may want to catch apart.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad command-line input: the ``fusedmoe`` command prints it as one line
    and exits with code 2 (no traceback)."""


class CheckpointError(ValueError):
    """A checkpoint (Hugging Face or our own) that cannot be read or written as
    asked; the message names the file, tensor or config field and says why."""
