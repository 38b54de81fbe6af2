"""Grouped matrix multiply: one API, one file per backend, a small registry.

``gmm(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]``: the rows of
``lhs`` are sorted by group; the ``group_sizes[g]`` consecutive rows of group
``g`` are multiplied by ``rhs[g]``. Rows past ``sum(group_sizes)`` come out as
zeros (the semantics of :func:`jax.lax.ragged_dot`).

``tgmm(lhs [M, K], dout [M, N], group_sizes [G]) -> [G, K, N]``: the grouped
"transposed" product ``out[g] = lhs_g.T @ dout_g``, i.e. the weight gradient of
``gmm``.

Backends live in ``fusedmoe/grouped_matmul/<name>.py``, one file each, listed by name in
``fusedmoe/grouped_matmul/registry.py``.

``fusedmoe.gmm`` and ``fusedmoe.tgmm`` are the two functions of this package.
"""

from fusedmoe.grouped_matmul.api import gmm, tgmm
from fusedmoe.grouped_matmul.registry import available_backends, backend_names, resolve_backend

__all__ = ["gmm", "tgmm", "available_backends", "backend_names", "resolve_backend"]

