"""The backend registry: a name -> implementation table, and ``"auto"``.

A backend is a module exposing ``gmm(lhs, rhs, group_sizes, out_dtype)`` and
``tgmm(lhs, dout, group_sizes, out_dtype)`` on already-validated arrays, both
differentiable, plus ``unavailable_reason() -> str | None``. Registering is one
line in ``_BACKEND_MODULES``; modules are imported lazily so an optional
dependency (tokamax) costs nothing until it is asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import jax
import jax.numpy as jnp

# name -> module path. Order is the order shown to users.
_BACKEND_MODULES: dict[str, str] = {
    "tiled": "fusedmoe.grouped_matmul.tiled",
    "cpu_kernel": "fusedmoe.grouped_matmul.cpu_kernel",
    "ragged_dot": "fusedmoe.grouped_matmul.ragged_dot",
    "megablox": "fusedmoe.grouped_matmul.megablox",
    "tokamax": "fusedmoe.grouped_matmul.tokamax",
}

AUTO = "auto"


def backend_names() -> tuple[str, ...]:
    """Every name ``gmm`` accepts as ``backend``, ``"auto"`` first."""
    return (AUTO, *_BACKEND_MODULES)


def check_backend_name(backend: object, argument: str = "backend") -> str:
    """Raise a ``ValueError`` naming the valid choices when ``backend`` is unknown."""
    if not isinstance(backend, str) or backend not in backend_names():
        raise ValueError(
            f"{argument}: unknown grouped-matmul backend {backend!r}; "
            f"expected one of {', '.join(repr(n) for n in backend_names())}"
        )
    return backend


def auto_backend(platform: str | None = None, dtype=None) -> str:
    """The backend ``"auto"`` picks on ``platform`` (default: jax's default backend)
    for inputs of ``dtype`` (default: float32).

    - TPU: ``megablox`` (the Pallas kernel written for it).
    - CPU: ``cpu_kernel`` for f32 inputs when it can run here (a compiler and an
      AVX2 CPU), and for bf16 inputs when its build multiplies bf16 pairs (a CPU
      with AVX-512 BF16: 0.56x-0.79x the dense bf16 GEMM where ``tiled`` took
      0.60x-1.35x); else ``tiled``, which for bf16 beats the kernel's build that
      widens bf16 to f32, since XLA:CPU's own bf16 dots use the CPU's bf16
      instructions. Other dtypes take ``tiled``. (``ragged_dot`` lowers to a
      masked dense product on CPU, G x the FLOPs; docs/backends.md has the
      measurements.)
    - GPU: for 16-bit inputs (bf16, f16) ``tokamax`` when installed and its
      kernels run here (its ``unavailable_reason`` runs a small product once),
      else ``tiled``. f32 and other inputs take ``tiled``: tokamax's GPU kernels
      are 16-bit only, and its f32 fallback ran 2x (forward) to 3.3x
      (forward+backward) ``tiled``'s time at G=64 on an H200. ``tiled`` beat
      ``ragged_dot`` there in 12 of 16 benchmark cells, and its memory does not
      grow with G x rows as ``ragged_dot``'s expansion does.
    """
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "megablox"
    sixteen_bit = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if (
        platform in ("gpu", "cuda", "rocm")
        and sixteen_bit
        and _load("tokamax").unavailable_reason() is None
    ):
        return "tokamax"
    if platform == "cpu":
        kernel = _load("cpu_kernel")
        f32 = dtype is None or jnp.dtype(dtype) == jnp.float32
        bf16 = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
        if f32 and kernel.unavailable_reason() is None:
            return "cpu_kernel"
        if bf16 and kernel.multiplies_bf16_pairs():
            return "cpu_kernel"
    return "tiled"


def _load(name: str) -> ModuleType:
    return importlib.import_module(_BACKEND_MODULES[name])


def resolve_backend(backend: str = AUTO, dtype=None) -> ModuleType:
    """Return the module implementing ``backend`` (for inputs of ``dtype`` when it
    is ``"auto"``); raise if it cannot run here."""
    name = check_backend_name(backend)
    if name == AUTO:
        name = auto_backend(dtype=dtype)
    module = _load(name)
    reason = module.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return module


def available_backends() -> dict[str, str | None]:
    """name -> ``None`` when usable here, else the reason it is not."""
    return {name: _load(name).unavailable_reason() for name in _BACKEND_MODULES}
