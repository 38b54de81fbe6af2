"""A module's parameters filled in place from checkpoint tensors, one array at a time.

Reading a layer's expert tensors, stacking them into unfused arrays, fusing
those and copying the result to the device holds three copies of the layer
at once. Here each parameter's final array is allocated once, in its final
dtype and layout (fused or not), and every source tensor is written straight
into its slot (a :class:`~fusedmoe.checkpoint.layouts.Piece`), then dropped.
An array goes to the device as soon as its last piece is in, before the next
array is started. So host memory holds the arrays being filled plus one
source tensor, on top of what is already on the device; on a CPU the device
array *is* the host array (:func:`to_device` hands it over without a copy).

The pieces name unfused targets (``wi_0``, ``wi_1``, ``shared_wi_0``, ...); where
the module is fused, :func:`fusedmoe.checkpoint.fusion.unfuse_state` on the
fused array gives the unfused views to write into, so the fused layout is
defined in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from fusedmoe.checkpoint.layouts import Piece

_ALIGN = 64  # XLA:CPU takes a host array without a copy when it is this aligned


def empty_aligned(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def to_device(array: np.ndarray):
    """``array`` on the default device. On a CPU an aligned array becomes the device
    array itself (no copy), so it must not be written afterwards."""
    import jax

    return jax.device_put(array)


def _split(path: str) -> tuple[str, str]:
    head, _, name = path.rpartition("/")
    return (head + "/" if head else ""), name


def _slots(like: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Unfused target path -> (the parameter holding it, its name in
    ``unfuse_state``'s output): ``ffn/wi_0`` -> (``ffn/wi``, ``wi_0``) in a fused
    module, ``ffn/wi_0`` -> (``ffn/wi_0``, ``wi_0``) in an unfused one."""
    from fusedmoe.checkpoint.fusion import unfuse_state  # imports jax: not at module load

    out = {}
    for path, leaf in like.items():
        head, name = _split(path)
        ghost = np.broadcast_to(np.empty((), leaf.dtype), tuple(leaf.shape))  # no memory
        for part in unfuse_state({name: ghost}):
            out[head + part] = (path, part)
    return out


def fill(pieces: Iterable[Piece], like: Mapping[str, Any], read: Callable[[str], np.ndarray],
         put: Callable[[np.ndarray], Any] = to_device) -> dict[str, Any]:
    """Every parameter of ``like`` (path -> anything with ``shape`` and ``dtype``,
    e.g. a module's abstract state) built from ``pieces`` (targets are unfused
    paths in the same tree) and the tensors ``read(source)`` returns; each handed
    to ``put`` once complete. Returns path -> what ``put`` returned.

    Each source is read once, in the order of the first parameter it feeds, and
    dropped once its pieces are written; a parameter's buffer exists from its
    first piece to its last.
    """
    from fusedmoe.checkpoint.fusion import unfuse_state

    slots = _slots(like)
    order = {path: i for i, path in enumerate(like)}
    by_source: dict[str, list[Piece]] = {}
    left: dict[str, int] = dict.fromkeys(like, 0)
    for piece in pieces:
        if piece.target not in slots:
            raise KeyError(f"fill: piece {piece.source!r} -> {piece.target!r}: the module has "
                           f"no such parameter (it has {sorted(like)[:8]} ...)")
        by_source.setdefault(piece.source, []).append(piece)
        left[slots[piece.target][0]] += 1
    empty = [path for path, count in left.items() if count == 0]
    if empty:
        raise KeyError(f"fill: no piece writes parameter(s) {empty}")
    sources = sorted(by_source, key=lambda s: min(order[slots[p.target][0]]
                                                  for p in by_source[s]))
    buffers: dict[str, np.ndarray] = {}
    written: dict[str, int] = dict.fromkeys(like, 0)
    out: dict[str, Any] = {}
    for source in sources:
        tensor = read(source)
        for piece in by_source[source]:
            path, part = slots[piece.target]
            if path not in buffers:
                buffers[path] = empty_aligned(tuple(like[path].shape), like[path].dtype)
            dest = unfuse_state({_split(path)[1]: buffers[path]})[part][piece.index]
            value = piece.view(tensor)
            if dest.shape != value.shape:
                raise ValueError(f"fill: {source!r} gives {piece.target!r}{list(piece.index)} "
                                 f"shape {value.shape}, the parameter needs {dest.shape}")
            dest[...] = value  # casts to the parameter's dtype
            written[path] += value.size
            left[path] -= 1
            if left[path] == 0:
                if written[path] != buffers[path].size:  # pieces that leave a gap
                    raise RuntimeError(f"fill: parameter {path!r}: pieces wrote "
                                       f"{written[path]} of {buffers[path].size} values")
                out[path] = put(buffers.pop(path))
        del tensor
    return out


# ----------------------------------------------------------------------------- nested trees
def tree_leaves(tree: Mapping, keys: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(keys, leaf)`` of a nested dict, depth first, in insertion order."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from tree_leaves(value, (*keys, key))
        else:
            yield (*keys, key), value


def tree_path(keys: tuple) -> str:
    """``("blocks", 0, "ffn", "wi")`` -> ``"blocks/0/ffn/wi"``: the paths pieces target."""
    return "/".join(str(k) for k in keys)


def tree_set(tree: dict, keys: tuple, value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def fill_tree(pieces: Iterable[Piece], like: Mapping, read: Callable[[str], np.ndarray],
              put: Callable[[np.ndarray], Any] = to_device) -> dict:
    """:func:`fill` on a nested dict (``nnx.state(module).to_pure_dict()`` of an
    abstract module): the same nesting, with what ``put`` returned as leaves."""
    keys_of = {tree_path(keys): keys for keys, _ in tree_leaves(like)}
    leaves = dict(tree_leaves(like))
    filled = fill(pieces, {path: leaves[keys] for path, keys in keys_of.items()}, read, put)
    out: dict = {}
    for path, value in filled.items():
        tree_set(out, keys_of[path], value)
    return out
