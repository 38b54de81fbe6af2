"""Fused <-> unfused parameters of :class:`fusedmoe.MoE`, bit-exact both ways.

Works on plain nested dicts (``nnx.state(module).to_pure_dict()``, or a restored
orbax tree), so it applies to a lone layer and to every MoE layer inside a
model alike: any sub-dict holding ``wi_0`` and ``wi_1`` is an MoE layer.

=======================  =====================================================
unfused                  fused
=======================  =====================================================
``wi_0``, ``wi_1``       ``wi = stack([wi_0, wi_1], axis=-2)``: [G, K, 2, N]
``wi_0_bias``, ...       ``wi_bias``: [G, 2, N]
``shared_wi_0``, ...     ``shared_wi``: [K, 2, Ns]
=======================  =====================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

# (unfused gate name, unfused up name, fused name)
_PAIRS = (
    ("wi_0", "wi_1", "wi"),
    ("wi_0_bias", "wi_1_bias", "wi_bias"),
    ("shared_wi_0", "shared_wi_1", "shared_wi"),
)


def _stack(gate, up):
    # Keep host arrays on the host (restored checkpoints), device arrays on device.
    if isinstance(gate, np.ndarray):
        return np.stack([gate, up], axis=-2)
    return jnp.stack([gate, up], axis=-2)


def fuse_state(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Every ``wi_0``/``wi_1`` pair (and biases, shared experts) -> one fused tensor."""
    out = {}
    for key, value in tree.items():
        out[key] = fuse_state(value) if isinstance(value, Mapping) else value
    for gate, up, fused in _PAIRS:
        if gate in out or up in out:
            if gate not in out or up not in out:
                raise KeyError(f"fuse_state: found only one of {gate!r}/{up!r} in {sorted(out)}")
            if fused in out:
                raise KeyError(f"fuse_state: {fused!r} already present beside {gate!r}")
            if out[gate].shape != out[up].shape:
                raise ValueError(
                    f"fuse_state: {gate} {out[gate].shape} and {up} {out[up].shape} differ"
                )
            out[fused] = _stack(out.pop(gate), out.pop(up))
    return out


def unfuse_state(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Every fused ``wi`` (and ``wi_bias``, ``shared_wi``) -> its gate and up halves."""
    out = {}
    for key, value in tree.items():
        out[key] = unfuse_state(value) if isinstance(value, Mapping) else value
    for gate, up, fused in _PAIRS:
        if fused in out and not isinstance(out[fused], Mapping):
            w = out.pop(fused)
            if w.ndim < 2 or w.shape[-2] != 2:
                raise ValueError(f"unfuse_state: {fused} must have a size-2 axis -2, got {w.shape}")
            out[gate], out[up] = w[..., 0, :], w[..., 1, :]
    return out
