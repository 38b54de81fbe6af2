"""The dense GEMMs of equal FLOPs that benchmark rows are measured against, in
every library of this process that has them, and which of them is the limit.

"x dense" is only an honest limit if the dense GEMM is the fastest this
machine has for that dtype: on a CPU with AMX, torch's bf16 matmul (oneDNN)
runs several times as fast as XLA's bf16 dot, and a ratio to XLA's hides that.
So each dense program is timed twice, side by side in the same rounds as the
rows: jitted by XLA (:data:`XLA`) and, when ``import torch`` works and jax runs
on the CPU, with ``torch.matmul`` on CPU tensors (:data:`TORCH`). Each row's
ratio is to the faster of the two (:func:`limit`), named in its output; XLA's
time is kept beside it.

A dense program is a function of arrays written with ``@`` and ``.T`` only,
so the same Python function runs on jax arrays and on torch tensors: both
libraries compute exactly the same products.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fusedmoe.bench.timing import Timing

XLA = "dense"  # the candidate names in time_side_by_side
TORCH = "dense_torch"
NAMES = (XLA, TORCH)


def torch_unavailable_reason(platform: str) -> str | None:
    """Why torch's dense GEMM is not timed in this run, or None."""
    if platform != "cpu":
        return f"torch's dense GEMM is timed on CPU only (jax runs on {platform})"
    try:
        import torch  # noqa: F401
    except Exception as exc:  # an install without the hf extra
        return f"torch does not import ({exc.__class__.__name__}); pip install 'fusedmoe[hf]'"
    return None


def torch_label(dtype) -> str:
    """``torch`` and the library its CPU matmul calls for ``dtype``: oneDNN for
    bf16 (its verbose log shows brgemm matmuls), MKL for f32 where torch was
    built with it (its ``BLAS_INFO``); plain ``torch`` where torch does not import."""
    import jax.numpy as jnp

    try:
        import torch
    except ImportError:
        return "torch"

    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and torch.backends.mkldnn.is_available():
        return "torch (oneDNN)"
    if dtype == jnp.float32 and torch.backends.mkl.is_available():
        return "torch (MKL)"
    return "torch"


def label(name: str, dtype) -> str:
    """What the output calls the dense candidate ``name`` (``XLA`` or ``TORCH``)."""
    return "XLA" if name == XLA else torch_label(dtype)


def _use_all_cores_in_torch() -> None:
    # A fair comparison: torch gets as many threads as this process may use,
    # the cores XLA's CPU client runs on too (torch's default can differ, e.g.
    # under a CPU quota or a taskset).
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))


def candidates(fn: Callable, args: Sequence, platform: str) -> dict[str, tuple[Callable, tuple]]:
    """name -> (callable, its arguments) for :func:`fusedmoe.bench.timing.time_side_by_side`:
    ``fn(*args)`` compiled by XLA ahead of time, and with torch on the same values
    when :func:`torch_unavailable_reason` is None. ``args``: jax arrays."""
    import jax

    xla = jax.jit(fn).lower(*args).compile()
    found = {XLA: (xla, tuple(args))}
    if torch_unavailable_reason(platform) is None:
        _use_all_cores_in_torch()
        found[TORCH] = (_torch_program(fn), tuple(_to_torch(a) for a in args))
    return found


def _torch_program(fn: Callable) -> Callable:
    import torch

    def run(*tensors):
        with torch.inference_mode():
            fn(*tensors)
        # torch's CPU ops are done when they return; nothing for jax to wait on.

    return run


def _to_torch(array):
    """The torch tensor of a jax array's values, in its dtype (through f32, exact
    for bf16 and f16)."""
    import numpy as np
    import torch

    dtype = getattr(torch, str(array.dtype))
    return torch.from_numpy(np.array(array, np.float32)).to(dtype).contiguous()


@dataclasses.dataclass(frozen=True)
class Limit:
    """The dense GEMMs timed in one set of rounds: the fastest (``limit``, named
    ``label``), and XLA's and torch's own (``torch`` None where it was not timed)."""

    label: str
    limit: Timing
    xla: Timing | None
    torch: Timing | None

    def fields(self) -> dict[str, Any]:
        """The row fields every benchmark row carries about its dense limit."""
        return {
            "dense_limit": self.label,
            "dense_median_s": self.limit.median,
            "dense_min_s": self.limit.min,
            "xla_dense_median_s": None if self.xla is None else self.xla.median,
            "torch_dense_median_s": None if self.torch is None else self.torch.median,
        }


def limit(timings: dict[str, Timing], dtype) -> Limit | None:
    """The faster (by median) of the dense candidates in ``timings``, or None when
    none of them was timed."""
    timed = [name for name in NAMES if name in timings]
    if not timed:
        return None
    fastest = min(timed, key=lambda name: timings[name].median)
    return Limit(label(fastest, dtype), timings[fastest], timings.get(XLA), timings.get(TORCH))
