"""Where a decoder's parameters live on a ``data``/``expert``/``tensor`` mesh.

The MoE layers place themselves (:mod:`fusedmoe.placement`: experts over
``expert``, their mlp dim over ``tensor``). Around them, attention heads and
the dense FFN's width are split over ``tensor`` (query, key and value
projections by output column, i.e. by head; the output projection by input
row; attention sinks by head; ``w_in``/``w_out`` by the mlp dim); everything
else (embedding, norms, the fused ``qkv`` of the toy model, the LM head) is
replicated. Multi-head latent attention splits its per-head projections
(``q`` or ``q_b``, ``kv_b``, ``out``) the same way; what every head shares
(``q_a``, ``kv_a``, their norms: the latent the cache holds) is replicated.
XLA's partitioner then inserts the one all-reduce per attention and per dense
FFN.

That split needs the mesh's tensor axis to be ``Auto`` (what ``Mesh(...)``
makes): on an ``Explicit`` axis (``jax.make_mesh``'s default) jax asks every
contraction over a sharded dimension for its output sharding, which the
attention's einsums do not give yet, so there the parameters stay replicated
(and the results are the same). A head count or width the axis does not
divide stays replicated too.
"""

from __future__ import annotations

from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedmoe.model.config import ModelConfig


def tensor_axis(config: ModelConfig, mesh: Mesh) -> str | None:
    """The mesh axis to split heads and widths over, or None (replicate)."""
    name = config.moe.tensor_axis
    if name not in mesh.shape or mesh.shape[name] == 1:
        return None
    if mesh.axis_types[mesh.axis_names.index(name)] != AxisType.Auto:
        return None
    return name


def block_specs(config: ModelConfig, mesh: Mesh, is_moe: bool) -> dict[tuple[str, ...], P]:
    """PartitionSpec by path in a block, for the parameters split over ``tensor``
    (the rest are replicated; an MoE block's FFN is the MoE layer's business)."""
    t = tensor_axis(config, mesh)
    if t is None:
        return {}
    tp, c = mesh.shape[t], config
    specs: dict[tuple[str, ...], P] = {}
    if c.attention == "mla":
        if c.num_heads % tp == 0:
            for name in ("q", "q_b", "kv_b"):  # columns by head; none has a bias
                specs[("attn", name, "kernel")] = P(None, t)
            specs[("attn", "out", "kernel")] = P(t, None)
    elif not c.fused_qkv and c.num_heads % tp == 0 and c.kv_heads % tp == 0:
        for name in ("q", "k", "v"):
            specs[("attn", name, "kernel")] = P(None, t)
            specs[("attn", name, "bias")] = P(t)
        specs[("attn", "out", "kernel")] = P(t, None)
        specs[("attn", "sinks")] = P(t)
    if not is_moe and c.ffn_dim % tp == 0:
        specs[("ffn", "w_in")] = P(None, None, t)
        specs[("ffn", "w_out")] = P(t, None)
    return specs


def place(model, mesh: Mesh) -> None:
    """Put every parameter of ``model`` (a :class:`fusedmoe.model.Decoder`) where it
    belongs on ``mesh``, in place (inside ``jit``: as sharding constraints)."""
    from flax import nnx

    from fusedmoe.placement import Placement, put, shard_module

    specs = [block_specs(model.config, mesh, block.is_moe) for block in model.blocks]
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Variable):
            continue
        spec = P()
        if path[0] == "blocks":
            block, rel = path[1], tuple(str(p) for p in path[2:])
            if rel[0] == "ffn" and model.blocks[block].is_moe:
                continue  # below
            spec = specs[block].get(rel, P())
        node.set_value(put(node.get_value(), NamedSharding(mesh, spec)))
    for block in model.blocks:
        if block.is_moe:
            shard_module(block.ffn, Placement(block.ffn.config, mesh))
