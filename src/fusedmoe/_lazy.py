"""Names of a package imported the first time they are used (PEP 562).

``fusedmoe``, ``fusedmoe.checkpoint`` and ``fusedmoe.train`` export names whose
modules import jax; importing the package itself must not (``fusedmoe --help``
imports every subcommand's module to build its parser).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``, whose ``exports`` map each public
    name to the module that defines it: a name is imported on first use and kept
    in the package, so later lookups skip ``__getattr__``."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
