"""The backend registry: a name -> backend table, and ``"auto"``.

Each backend is a :class:`fusedmoe.grouped_matmul.backend.Backend` in its own
module, which exposes it as ``BACKEND``; registering one is one line in
:data:`_BACKEND_MODULES`. Modules are imported when first asked for, so an
optional dependency (tokamax) costs nothing until then.

``"auto"`` asks every backend how well it suits the platform and the inputs'
dtype (:meth:`~fusedmoe.grouped_matmul.backend.Backend.suitability`) and takes
the best one that can run here. When a better-suited backend cannot (no C++
compiler for ``cpu_kernel``, tokamax not installed on a GPU), it says so once
per process, with the reason, and goes on with the next.
"""

from __future__ import annotations

import importlib
import warnings

import jax

from fusedmoe.grouped_matmul.backend import NEVER, Backend

# name -> module path. Order is the order shown to users (and breaks ties for auto).
_BACKEND_MODULES: dict[str, str] = {
    "tiled": "fusedmoe.grouped_matmul.tiled",
    "cpu_kernel": "fusedmoe.grouped_matmul.cpu_kernel",
    "ragged_dot": "fusedmoe.grouped_matmul.ragged_dot",
    "megablox": "fusedmoe.grouped_matmul.megablox",
    "tokamax": "fusedmoe.grouped_matmul.tokamax",
}

AUTO = "auto"
_PLATFORMS = {"cuda": "gpu", "rocm": "gpu"}  # jax's platform names -> ours
_warned: set[tuple[str, str]] = set()


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


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (not ``"auto"``), imported on first use."""
    return importlib.import_module(_BACKEND_MODULES[check_backend_name(name)]).BACKEND


def auto_backend(platform: str | None = None, dtype=None) -> str:
    """The name of the backend ``"auto"`` picks on ``platform`` (default: jax's
    default backend) for inputs of ``dtype`` (default: float32)."""
    platform = platform or jax.default_backend()
    platform = _PLATFORMS.get(platform, platform)
    ranked = sorted(
        ((get_backend(name).suitability(platform, dtype), -order, name)
         for order, name in enumerate(_BACKEND_MODULES)),
        reverse=True,
    )
    passed_over = []
    for score, _, name in ranked:
        if score == NEVER:
            break
        reason = get_backend(name).unavailable_reason()
        if reason is None:
            for other, why in passed_over:
                _warn_once(other, why, name)
            return name
        passed_over.append((name, reason))
    raise RuntimeError(f"no grouped-matmul backend runs on {platform!r}: {passed_over}")


def _warn_once(skipped: str, reason: str, chosen: str) -> None:
    if (skipped, reason) in _warned:
        return
    _warned.add((skipped, reason))
    warnings.warn(
        f"fusedmoe: backend 'auto' uses {chosen!r} here, not {skipped!r}, which would be "
        f"faster but cannot run: {reason}",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve_backend(backend: str = AUTO, dtype=None) -> Backend:
    """The backend ``backend`` names (for inputs of ``dtype`` when it is ``"auto"``);
    a ``RuntimeError`` with the reason if it cannot run here."""
    name = check_backend_name(backend)
    if name == AUTO:
        name = auto_backend(dtype=dtype)
    chosen = get_backend(name)
    reason = chosen.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return chosen


def available_backends() -> dict[str, str | None]:
    """name -> ``None`` when usable here, else the reason it is not."""
    return {name: get_backend(name).unavailable_reason() for name in _BACKEND_MODULES}
