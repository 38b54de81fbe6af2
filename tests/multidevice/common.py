"""Shared by the multi-device check scripts: a tiny layer, one jitted step that
returns output, aux losses and every gradient, and the comparison.

Imported only by scripts that have already set XLA_FLAGS (and, for two
processes, called ``jax.distributed.initialize``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedmoe import MoE, MoEConfig
from fusedmoe.placement import put

AXES = ("data", "expert", "tensor")
MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
TOL = 1e-5
BATCH, SEQ = 4, 8  # 32 tokens: 4 per device on 8 devices


def config(**changes) -> MoEConfig:
    base = MoEConfig(
        num_experts=8, num_experts_per_tok=2, emb_dim=16, mlp_dim=8, mlp_bias=True,
        shared_experts=1, load_balance_loss_weight=0.01, router_z_loss_weight=0.001,
    )
    return base.replace(**changes)


def make_mesh(shape, devices=None, axis_types=None) -> Mesh:
    """A ``Mesh`` of ``shape`` over (data, expert, tensor); ``axis_types``: a
    ``jax.sharding.AxisType`` per axis (default: ``Mesh``'s own, Auto)."""
    devices = jax.devices() if devices is None else devices
    grid = np.array(devices[: int(np.prod(shape))]).reshape(shape)
    if axis_types is None:
        return Mesh(grid, AXES)
    return Mesh(grid, AXES, axis_types=axis_types)


def layer(cfg: MoEConfig, mesh=None) -> MoE:
    """Seed 0; the zero-initialised biases set to seeded random values (so a bias
    added once per tensor shard, not once, would show)."""
    m = MoE(cfg, rngs=nnx.Rngs(0), mesh=mesh)
    if not cfg.mlp_bias:
        return m
    g, n, k = cfg.num_experts, cfg.mlp_dim, cfg.emb_dim
    wi_bias = jax.random.normal(jax.random.key(101), (g, 2, n))
    values = {"wi_bias": wi_bias, "wi_0_bias": wi_bias[:, 0], "wi_1_bias": wi_bias[:, 1],
              "wo_bias": jax.random.normal(jax.random.key(102), (g, k))}
    for name, value in values.items():
        var = getattr(m, name, None)
        if var is not None:
            var.set_value(value if mesh is None else put(value, var.get_value().sharding))
    return m


def inputs():
    x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, 16), jnp.float32)
    r = jax.random.normal(jax.random.key(2), (BATCH, SEQ, 16), jnp.float32)
    return x, r


def step(model: MoE, x, r, mesh=None):
    """``(out, aux losses, d params, d x)`` of ``sum(out * r) + aux_loss``, jitted;
    with a mesh every output comes back replicated (readable on every process)."""
    graphdef, state = nnx.split(model)

    def f(state, x, r):
        def loss(state, x):
            out, aux = nnx.merge(graphdef, state)(x)
            return jnp.sum(out * r) + aux["aux_loss"], (out, aux)

        (_, (out, aux)), (d_state, dx) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True)(state, x)
        aux = {k: v for k, v in aux.items() if k != "tokens_per_expert"}
        return out, aux, d_state, dx

    if mesh is None:
        return jax.jit(f)(state, x, r)
    if not NamedSharding(mesh, P()).is_fully_addressable:  # several processes
        x, r = (put(a, NamedSharding(mesh, P())) for a in (x, r))
    return jax.jit(f, out_shardings=NamedSharding(mesh, P()))(state, x, r)


def max_errors(ref, got) -> dict[str, float]:
    """Per part (out, each aux loss, each gradient): the largest absolute difference,
    divided by ``max(1, max |ref|)`` (an absolute error for values of order one, a
    relative one for the larger gradient sums)."""
    out_r, aux_r, ds_r, dx_r = ref
    out_g, aux_g, ds_g, dx_g = got
    errs = {"out": _err(out_r, out_g), "d_x": _err(dx_r, dx_g)}
    for k in ("load_balance_loss", "router_z_loss", "aux_loss"):
        errs[k] = _err(aux_r[k], aux_g[k])
    flat_r = dict(nnx.to_flat_state(ds_r))
    flat_g = dict(nnx.to_flat_state(ds_g))
    if set(flat_r) != set(flat_g):
        raise AssertionError(f"gradient trees differ: {sorted(flat_r)} vs {sorted(flat_g)}")
    for path, v in flat_r.items():
        errs["d_" + ".".join(map(str, path))] = _err(v[...], flat_g[path][...])
    return errs


def _err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return float("inf")
    if not a.size:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))
