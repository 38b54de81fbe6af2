"""Module state as nested dicts: which layout a tree is in, and writing a tree
into a module (in place, or into a freshly built abstract one), checked key by
key and shape by shape. Shared by every checkpoint format."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from fusedmoe.checkpoint.fusion import fuse_state, unfuse_state


def _walk(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield prefix, tree
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _walk(value, f"{prefix}/{key}" if prefix else str(key))


def tree_layout(tree: Mapping[str, Any]) -> str:
    """``fusedmoe_fused``, ``fusedmoe_unfused`` or ``none`` (raises on a mix of both)."""
    fused = unfused = False
    for _, node in _walk(tree):
        fused |= "wi" in node and not isinstance(node["wi"], Mapping)
        unfused |= "wi_0" in node
    if fused and unfused:
        raise ValueError("checkpoint: the state mixes fused 'wi' and unfused 'wi_0'/'wi_1' layers")
    return "fusedmoe_fused" if fused else "fusedmoe_unfused" if unfused else "none"


def _match_layout(saved: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` fused or unfused so that it matches the layout of ``like``."""
    want, have = tree_layout(like), tree_layout(saved)
    if want == have or "none" in (want, have):
        return dict(saved)
    return fuse_state(saved) if want == "fusedmoe_fused" else unfuse_state(saved)


def _check_same_structure(tree, like, where: str = "") -> None:
    if set(tree) != set(like):
        missing, extra = sorted(set(like) - set(tree)), sorted(set(tree) - set(like))
        raise ValueError(
            f"state {where or '/'}: keys do not match the module: missing {missing}, "
            f"unexpected {extra}"
        )
    for key, value in like.items():
        name = f"{where}/{key}" if where else key
        if isinstance(value, Mapping):
            if not isinstance(tree[key], Mapping):
                raise ValueError(f"state {name}: expected a sub-tree, got an array")
            _check_same_structure(tree[key], value, name)
        elif tuple(np.shape(tree[key])) != tuple(value.shape):
            raise ValueError(
                f"state {name}: shape {tuple(np.shape(tree[key]))} does not match the "
                f"module's {tuple(value.shape)}"
            )


def update_module(module, tree: Mapping[str, Any]) -> None:
    """Write ``tree`` (nested dict of arrays, fused or unfused) into ``module`` in place,
    after checking its keys and shapes; arrays take the module's dtypes."""
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(module)
    like = state.to_pure_dict()
    tree = _match_layout(tree, like)
    _check_same_structure(tree, like)
    cast = _map2(lambda a, ref: jnp.asarray(a, dtype=ref.dtype), tree, like)
    nnx.replace_by_pure_dict(state, cast)
    nnx.update(module, state)


def _map2(fn, tree, like):
    return {
        k: _map2(fn, tree[k], v) if isinstance(v, Mapping) else fn(tree[k], v)
        for k, v in like.items()
    }


def module_from_state(make: Callable[[], Any], tree: Mapping[str, Any]):
    """The module ``make()`` would build, holding ``tree`` instead of fresh
    parameters (fused or unfused: converted to the module's layout; checked
    against its keys and shapes; cast to its dtypes). ``make`` runs abstractly
    (``nnx.eval_shape``), so no random initialisation is computed."""
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(make))
    like = state.to_pure_dict()
    tree = _match_layout(tree, like)
    _check_same_structure(tree, like)
    nnx.replace_by_pure_dict(
        state, _map2(lambda a, ref: jnp.asarray(a, dtype=ref.dtype), tree, like)
    )
    return nnx.merge(graphdef, state)
