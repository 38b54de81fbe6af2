"""fusedmoe: fast, trustworthy Mixture-of-Experts layers for JAX.

``import fusedmoe`` is cheap: the names below are imported the first time they
are used (so the command line's ``--help`` does not wait for jax and flax).
It sets one thing in the process: malloc keeps freed host memory for reuse
(:mod:`fusedmoe.allocator`; ``FUSEDMOE_MALLOC=0`` opts out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusedmoe import allocator as _allocator
from fusedmoe._lazy import lazy_exports

__version__ = "0.1.0"

# The one change to the host process: malloc keeps freed memory for reuse
# (FUSEDMOE_MALLOC=0 opts out; see fusedmoe.allocator). Before jax starts its
# threads, where it works best.
_allocator.keep_freed_memory()

# public name -> module that defines it
_EXPORTS = {
    "MoE": "fusedmoe.layer",
    "RoutingBias": "fusedmoe.layer",
    "MoEConfig": "fusedmoe.config",
    "gmm": "fusedmoe.grouped_matmul",
    "tgmm": "fusedmoe.grouped_matmul",
    "available_backends": "fusedmoe.grouped_matmul",
    "backend_names": "fusedmoe.grouped_matmul",
}

__all__ = [  # noqa: RUF022 - the order of _EXPORTS
    "MoE", "RoutingBias", "MoEConfig", "gmm", "tgmm", "available_backends", "backend_names",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from fusedmoe.config import MoEConfig
    from fusedmoe.grouped_matmul import available_backends, backend_names, gmm, tgmm
    from fusedmoe.layer import MoE, RoutingBias


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
