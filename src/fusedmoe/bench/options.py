"""The command-line options both benchmark commands share, and how they are read.

Every list option (``--backend``, ``--dtype``, ``--preset``, ``--groups``, ...)
takes comma lists, repeated flags or both: ``--dtype float32,bf16`` and
``--dtype float32 --dtype bf16`` mean the same. Dtypes take their full or
short names (``float32``/``f32``, ``bfloat16``/``bf16``, ``float16``/``f16``);
backends every name :func:`fusedmoe.gmm` accepts, ``auto`` included.

Everything is checked before any work starts: a bad value is a
:class:`~fusedmoe.errors.UsageError` naming the option, what it got and what
it expects. This module imports no jax at import time (the ``fusedmoe``
command builds every subcommand's parser for ``--help``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

from fusedmoe import dtype_names
from fusedmoe.errors import UsageError

DTYPE_NAMES = dtype_names.ALIASES  # every accepted spelling -> the canonical name
SHORT_DTYPE = dtype_names.SHORT_NAMES
PLOT_EXTRA = "pip install 'fusedmoe[plot]'"


# --------------------------------------------------------------------------- argparse


def add_list_option(parser: argparse.ArgumentParser, flag: str, *, metavar: str,
                    help: str, default: str) -> None:
    """A list option: repeated flags collect, each may be a comma list."""
    parser.add_argument(flag, action="append", metavar=metavar,
                        help=f"{help}; a comma list or the flag repeated (default: {default})")


def add_shared_arguments(parser: argparse.ArgumentParser, *, default_dtypes: str,
                         default_repeats: int) -> None:
    """The options both benchmark commands have, spelled and checked alike."""
    add_list_option(parser, "--backend", metavar="NAME",
                    help="grouped-matmul backends: any name fusedmoe.gmm accepts, auto "
                         "included (its rows name the backend it picks); those that cannot "
                         "run here, or would take too long, are listed as skipped",
                    default="every backend but auto")
    add_list_option(parser, "--dtype", metavar="DTYPE",
                    help="dtypes: float32/f32, bfloat16/bf16, float16/f16",
                    default=default_dtypes)
    parser.add_argument("--repeats", default=str(default_repeats), metavar="N",
                        help=f"timed runs per row, median (default {default_repeats})")
    parser.add_argument("--dense-expansion-max-groups", default=None, metavar="G",
                        help="time ragged_dot/tokamax where they compute a masked dense "
                             "product over all G groups (off TPU; tokamax on CPU) only up to "
                             "this G (default: where the product's estimated time is at most "
                             "1 s a call)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the rows and the environment as JSON (rewritten as the "
                             "run goes, 'complete' false until it ends)")


# --------------------------------------------------------------------------- values


def list_items(values: Sequence[str] | str | None) -> list[str]:
    """The items of a list option given as comma lists, repeated flags or both,
    blanks dropped: ``["a,b", "c"]`` -> ``["a", "b", "c"]``."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]


def choices(option: str, values: Sequence[str] | str | None, valid: Sequence[str], *,
            default: Sequence[str], what: str,
            aliases: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The canonical names in ``values`` (``default`` when none is given), in
    order, each once. ``aliases`` maps other spellings to canonical names."""
    aliases = aliases or {}
    items = list_items(values) or list(default)
    chosen = []
    for item in items:
        name = aliases.get(item, item)
        if name not in valid:
            spelled = ", ".join(_spellings(valid, aliases))
            raise UsageError(f"{option}: unknown {what} {item!r}; expected one of {spelled}")
        chosen.append(name)
    return tuple(dict.fromkeys(chosen))


def _spellings(valid: Sequence[str], aliases: Mapping[str, str]) -> list[str]:
    """``name`` or ``name/other`` for each valid name and its other spellings."""
    return ["/".join([name, *(a for a, n in aliases.items() if n == name and a != name)])
            for name in valid]


def dtypes(values, default: Sequence[str]) -> tuple[str, ...]:
    """``--dtype``: canonical dtype names (``float32``, ``bfloat16``, ``float16``)."""
    valid = tuple(dict.fromkeys(DTYPE_NAMES.values()))
    return choices("--dtype", values, valid, default=default, what="dtype",
                   aliases=DTYPE_NAMES)


def backends(values) -> tuple[str, ...]:
    """``--backend``: backend names (``auto`` included); by default every backend but
    ``auto``, whose row would repeat the backend it picks."""
    from fusedmoe.grouped_matmul import backend_names

    names = backend_names()
    return choices("--backend", values, names, what="backend",
                   default=[name for name in names if name != "auto"])


def positive_int(option: str, text, minimum: int = 1) -> int:
    """An integer of at least ``minimum``, from the option's text."""
    try:
        value = int(str(text))
    except ValueError:
        raise UsageError(f"{option}: got {text!r}, expected an integer >= {minimum}") from None
    if value < minimum:
        raise UsageError(f"{option}: got {text!r}, expected an integer >= {minimum}")
    return value


def positive_ints(option: str, values, default: Sequence[int]) -> tuple[int, ...]:
    """A list option of integers >= 1, in order, each once."""
    items = list_items(values)
    return tuple(dict.fromkeys(positive_int(option, item) for item in items)) or tuple(default)


def positive_float(option: str, text) -> float:
    try:
        value = float(str(text))
    except ValueError:
        raise UsageError(f"{option}: got {text!r}, expected a positive number") from None
    if not value > 0:  # also refuses nan
        raise UsageError(f"{option}: got {text!r}, expected a positive number")
    return value


def optional_positive_int(option: str, text) -> int | None:
    return None if text is None else positive_int(option, text)


def output_path(option: str, path: str | None, kind: str) -> str | None:
    """``path`` when a ``kind`` file can be written there (its directory exists and
    is writable, and it is not a directory itself)."""
    if path is None:
        return None
    if os.path.isdir(path):
        raise UsageError(f"{option}: {path!r} is a directory; expected a {kind} file path")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise UsageError(f"{option}: cannot write {path!r} (directory missing or not writable)")
    return path


def plot_path(path: str | None) -> str | None:
    """``--plot``: a writable PNG path, and matplotlib installed (the ``plot``
    extra) so the run does not fail at its end."""
    if path is None:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"--plot: got {path!r}, but drawing needs matplotlib, which is not "
                         f"installed; {PLOT_EXTRA}") from None
    return output_path("--plot", path, "PNG")
