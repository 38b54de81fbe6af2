"""Where a decoder's parameters live on a ``data``/``expert``/``tensor`` mesh, and
how its attention and dense FFNs run there.

The MoE layers place and run themselves (:mod:`fusedmoe.placement`: experts over
``expert``, their mlp dim over ``tensor``). Around them, attention heads and the
dense FFN's width are split over ``tensor``: each attention class and
:class:`~fusedmoe.model.layers.DenseFFN` says which of its parameters are split
(``param_specs``: per-head projections by head, the output projection by input
row, gpt-oss's sinks by head, ``w_in``/``w_out`` by the mlp dim) and which stay
replicated (what every head shares: multi-head latent attention's ``q_a``,
``kv_a`` and their norms, the toy model's fused ``qkv`` (see
:class:`~fusedmoe.model.attention.GroupedQueryAttention`)); the embedding,
norms and LM head are replicated.

Each attention and dense FFN then runs as ONE program per device under
``jax.shard_map`` (:meth:`TensorSplit.run`), as the MoE layer does: the device
computes its own heads (or its slice of the width) and the partial outputs of
the output projection are summed over ``tensor`` (one ``psum``), the bias added
once. Inside ``shard_map`` every axis is manual, so the same code runs on
meshes of every axis type (``Auto`` from ``Mesh(...)``, ``Explicit`` from
``jax.make_mesh``, or mixed), with or without ``jax.set_mesh``; the inputs are
placed first with :func:`fusedmoe.placement.put`. A KV cache's heads are split
the same way (``cache_specs``), so the prefill and each decode step read and
write only the device's own heads. A head count or width that the tensor axis
does not divide stays replicated (every device computes all of it).

Tokens are replicated over the mesh around the MoE layers (each MoE layer splits
them over ``data`` and ``expert`` inside), so the attention of every
``data``/``expert`` device computes the whole batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedmoe.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TensorSplit:
    """One module's heads or width split over a mesh's tensor axis: ``mesh=None``
    is one device; ``axis=None`` is no split (everything replicated)."""

    mesh: Mesh | None = None
    axis: str | None = None

    @property
    def size(self) -> int:
        """How many devices share the split (1 when nothing is split)."""
        return int(self.mesh.shape[self.axis]) if self.axis else 1

    def own_slice(self, x: jax.Array, axis: int = -1) -> jax.Array:
        """This device's equal slice of ``x`` along ``axis`` (inside :meth:`run`;
        ``x`` itself when nothing is split)."""
        if not self.axis:
            return x
        size = x.shape[axis] // self.size
        return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(self.axis) * size, size, axis)

    def sum(self, x: jax.Array) -> jax.Array:
        """``x`` summed over the tensor axis (partial sums of a contraction over the split)."""
        return jax.lax.psum(x, self.axis) if self.axis else x

    def run(self, module, fn: Callable, args: tuple, arg_specs: tuple, out_specs) -> Any:
        """``fn(module, *args)`` as one program per device: on a mesh under
        ``jax.shard_map``, with ``module``'s parameters split per its
        ``param_specs()`` (the others replicated) and ``args`` per ``arg_specs``
        (placed first: a no-op for values already placed so); on one device
        directly."""
        if self.mesh is None:
            return fn(module, *args)
        from flax import nnx

        from fusedmoe.placement import put

        graphdef, state = nnx.split(module)
        specs = module.param_specs()
        state_specs = jax.tree_util.tree_map_with_path(
            lambda path, _: specs.get(_names(path), P()), state)
        in_specs = (state_specs, *arg_specs)
        values = jax.tree.map(lambda value, spec: put(value, NamedSharding(self.mesh, spec)),
                              (state, *args), in_specs)

        def per_device(state, *args):
            return fn(nnx.merge(graphdef, state), *args)

        return jax.shard_map(per_device, mesh=self.mesh, in_specs=in_specs,
                             out_specs=out_specs)(*values)


def _names(path) -> tuple[str, ...]:
    """A state leaf's key path as attribute names (``("q", "kernel")``)."""
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def run_attention(attn, x: jax.Array, positions: jax.Array, cache, cache_empty: bool):
    """``attn.per_device(x, positions, cache, cache_empty=...)`` as one program per
    device over ``attn.heads`` (:meth:`TensorSplit.run`): ``x [B, S, K]`` and
    ``positions [S]`` replicated, the cache split like ``attn.cache_specs()``.
    Returns ``(y [B, S, K], cache)``."""
    if cache is None:
        return attn.heads.run(attn, lambda a, *args: a.per_device(*args)[0], (x, positions),
                              (P(), P()), P()), None
    specs = attn.cache_specs()
    return attn.heads.run(
        attn, lambda a, *args: a.per_device(*args, cache_empty=cache_empty),
        (x, positions, cache), (P(), P(), specs), (P(), specs))


def tensor_split(config: ModelConfig, mesh: Mesh | None, *counts: int) -> TensorSplit:
    """How a module whose split dims have ``counts`` (heads, a width) runs on ``mesh``:
    split over its tensor axis when the mesh has one of size > 1 that divides them all."""
    if mesh is None:
        return TensorSplit()
    name = config.moe.tensor_axis
    size = int(mesh.shape[name]) if name in mesh.shape else 1
    if size == 1 or any(n % size for n in counts):
        return TensorSplit(mesh)
    return TensorSplit(mesh, name)


def place(model, mesh: Mesh) -> None:
    """Put every parameter of ``model`` (a :class:`fusedmoe.model.Decoder` built
    with ``mesh=mesh``) where it belongs on ``mesh``, in place (inside ``jit``: as
    sharding constraints)."""
    from flax import nnx

    from fusedmoe.placement import Placement, put, shard_module

    if model.mesh != mesh:
        raise ValueError("mesh: the model was built for another mesh (or none); build it "
                         "with Decoder(config, mesh=mesh) to place it on this one")
    specs: dict[tuple[str, ...], P] = {}
    for i, block in enumerate(model.blocks):
        owners = [("attn", block.attn)] + ([] if block.is_moe else [("ffn", block.ffn)])
        for name, module in owners:
            specs.update({("blocks", str(i), name, *rel): spec
                          for rel, spec in module.param_specs().items()})
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Variable):
            continue
        path = tuple(str(p) for p in path)
        if path[0] == "blocks" and path[2] == "ffn" and model.blocks[int(path[1])].is_moe:
            continue  # below
        node.set_value(put(node.get_value(), NamedSharding(mesh, _trimmed(specs.get(path, P())))))
    for block in model.blocks:
        if block.is_moe:
            shard_module(block.ffn, Placement(block.ffn.config, mesh))


def _trimmed(spec: P) -> P:
    """``spec`` without its trailing Nones (a replicated ``P(None, None)`` is ``P()``)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def place_cache(layer_cache, specs, mesh: Mesh | None):
    """A layer's cache (a pytree of arrays) placed per ``specs`` (the same tree of
    PartitionSpecs) on ``mesh``; as it is without one."""
    if mesh is None:
        return layer_cache
    from fusedmoe.placement import put

    return jax.tree.map(lambda a, spec: put(a, NamedSharding(mesh, _trimmed(spec))),
                        layer_cache, specs)
