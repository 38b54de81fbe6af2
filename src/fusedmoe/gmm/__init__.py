"""Grouped matrix multiply: one API, one file per backend, a small registry.

``gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]``: the rows of
``lhs`` are sorted by group; the ``group_sizes[g]`` consecutive rows of group
``g`` are multiplied by ``rhs[g]``. Rows past ``sum(group_sizes)`` come out as
zeros (the semantics of :func:`jax.lax.ragged_dot`).

``tgmm(lhs [M, K], dout [M, N], group_sizes [G]) -> [G, K, N]``: the grouped
"transposed" product ``out[g] = lhs_g.T @ dout_g``, i.e. the weight gradient of
``gmm``.

Backends live in ``fusedmoe/gmm/<name>.py``, one file each, listed by name in
``fusedmoe/gmm/registry.py``.

``fusedmoe.gmm`` is this package, and calling it calls :func:`gmm`: the API
is ``fusedmoe.gmm(lhs, rhs, group_sizes)``, and ``fusedmoe.gmm.tiled`` or
``import fusedmoe.gmm.tiled`` still reach a backend module. (Had the package
exported the *function* under its own name, the function would shadow the
package on ``fusedmoe`` and ``import fusedmoe.gmm.tiled as t`` would fail.)
"""

import sys
import types

from fusedmoe.gmm.api import gmm, tgmm
from fusedmoe.gmm.registry import available_backends, backend_names, resolve_backend

__all__ = ["gmm", "tgmm", "available_backends", "backend_names", "resolve_backend"]


class _CallablePackage(types.ModuleType):
    """This package's module type: ``fusedmoe.gmm(...)`` is :func:`gmm`."""

    def __call__(self, *args, **kwargs):
        return gmm(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
