"""``MoE``: the Flax NNX module that owns the parameters and hands them, as
arrays, to the layer's one computation (:mod:`fusedmoe.pipeline`).

Parameters (``G`` experts, ``K = emb_dim``, ``N = mlp_dim``):

===================  ===================  ==========================================
name                 shape                when
===================  ===================  ==========================================
``gate.kernel``      ``[K, G]``           always (the router); ``gate.bias`` [G]
                                          with ``router_bias``
``wi``               ``[G, K, 2, N]``     ``fused_moe_mlp``: ``[..., 0, :]`` gate,
                                          ``[..., 1, :]`` up
``wi_0``, ``wi_1``   ``[G, K, N]``        not ``fused_moe_mlp``
``wo``               ``[G, N, K]``        always
``wi_bias``          ``[G, 2, N]``        ``mlp_bias`` and fused
``wi_0_bias``, ...   ``[G, N]``           ``mlp_bias`` and not fused
``wo_bias``          ``[G, K]``           ``mlp_bias``
``selection_bias``   ``[G]``              ``routing_selection_bias`` (a
                                          :class:`RoutingBias`, not a Param)
``shared_wi`` /      ``[K, 2, Ns]`` /     ``shared_experts`` (same fused/unfused
``shared_wi_0/1``    ``[K, Ns]``          choice as the routed experts)
``shared_wo``        ``[Ns, K]``          ``shared_experts``
``shared_gate``      ``kernel [K, 1]``    ``shared_expert_gate``
===================  ===================  ==========================================

Fused and unfused layers built from the same seed hold the same numbers:
``wi[:, :, 0] == wi_0`` and ``wi[:, :, 1] == wi_1``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from fusedmoe import experts, pipeline
from fusedmoe.config import MoEConfig
from fusedmoe.placement import Placement, shard_module, validate_mesh


class RoutingBias(nnx.Variable):
    """The selection-only routing bias: updated by a balancing rule, not by gradients."""


def _normal(key, shape, fan_in, dtype):
    return (jax.random.normal(key, shape, jnp.float32) * fan_in**-0.5).astype(dtype)


class MoE(nnx.Module):
    """A Mixture-of-Experts feed-forward layer.

    ``MoE(config, rngs=nnx.Rngs(0))(x [B, S, K]) -> (out [B, S, K], aux)`` where
    ``aux`` has ``load_balance_loss``, ``router_z_loss``, ``aux_loss`` (the two,
    weighted as configured), ``tokens_per_expert [G]`` and ``dropped_rows`` (the
    (token, slot) rows dropped for capacity: dense path or ``expert_capacity_factor``).

    With ``mesh=`` (a ``jax.sharding.Mesh`` of any axis types, made by
    ``jax.make_mesh`` or ``Mesh``) the parameters are placed on it and each call
    runs data, expert and tensor parallel (see :mod:`fusedmoe.placement`); the
    output has the input's sharding.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, mesh=None):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
        if mesh is not None:
            validate_mesh(config, mesh)
        self.mesh = mesh
        self.config = c = config
        g, k, n, pdt = c.num_experts, c.emb_dim, c.mlp_dim, c.param_dtype
        self.gate = nnx.Linear(
            k, g, use_bias=c.router_bias, dtype=jnp.float32, param_dtype=pdt,
            kernel_init=nnx.initializers.normal(k**-0.5), rngs=rngs,
        )
        # Draw gate and up together so fused and unfused layers of one seed agree.
        wi = _normal(rngs.params(), (g, k, 2, n), k, pdt)
        if c.fused_moe_mlp:
            self.wi = nnx.Param(wi)
        else:
            self.wi_0 = nnx.Param(wi[:, :, 0])
            self.wi_1 = nnx.Param(wi[:, :, 1])
        self.wo = nnx.Param(_normal(rngs.params(), (g, n, k), n, pdt))
        if c.mlp_bias:
            if c.fused_moe_mlp:
                self.wi_bias = nnx.Param(jnp.zeros((g, 2, n), pdt))
            else:
                self.wi_0_bias = nnx.Param(jnp.zeros((g, n), pdt))
                self.wi_1_bias = nnx.Param(jnp.zeros((g, n), pdt))
            self.wo_bias = nnx.Param(jnp.zeros((g, k), pdt))
        if c.routing_selection_bias:
            self.selection_bias = RoutingBias(jnp.zeros((g,), jnp.float32))
        if c.shared_mlp_dim:
            ns = c.shared_mlp_dim
            shared_wi = _normal(rngs.params(), (k, 2, ns), k, pdt)
            if c.fused_moe_mlp:
                self.shared_wi = nnx.Param(shared_wi)
            else:
                self.shared_wi_0 = nnx.Param(shared_wi[:, 0])
                self.shared_wi_1 = nnx.Param(shared_wi[:, 1])
            self.shared_wo = nnx.Param(_normal(rngs.params(), (ns, k), ns, pdt))
            if c.shared_expert_gate:
                self.shared_gate = nnx.Linear(
                    k, 1, use_bias=False, dtype=jnp.float32, param_dtype=pdt,
                    kernel_init=nnx.initializers.normal(k**-0.5), rngs=rngs,
                )
        if mesh is not None:
            shard_module(self, Placement(config, mesh))

    @classmethod
    def from_state(cls, config: MoEConfig, state) -> MoE:
        """A layer of ``config`` holding ``state`` (a nested dict of arrays, fused or
        unfused: converted to ``config``'s layout), with no random initialisation."""
        from fusedmoe.checkpoint.state import module_from_state

        return module_from_state(lambda: cls(config, rngs=nnx.Rngs(0)), state)

    # ------------------------------------------------------------------ forward
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        self._check_input(x)
        c = self.config
        placement = Placement(c, self.mesh)
        tokens = _to_tokens(x, self.mesh, placement.axes.batch).astype(c.compute_dtype)
        out, aux = pipeline.moe(tokens, self.weights(), c, placement)
        return _from_tokens(out, x, self.mesh).astype(x.dtype), aux

    def expert_weights(self) -> experts.ExpertWeights:
        """The routed experts' weights as arrays in the compute dtype."""
        dt = self.config.compute_dtype
        return experts.ExpertWeights(
            **{n: None if (v := self._param(n)) is None else v.astype(dt)
               for n in experts.ExpertWeights._fields}
        )

    def weights(self) -> pipeline.MoEWeights:
        """Every array the layer computes with (:class:`fusedmoe.pipeline.MoEWeights`)."""
        shared = None
        if self.config.shared_mlp_dim:
            shared_gate = getattr(self, "shared_gate", None)
            shared = pipeline.SharedWeights(
                wo=self._param("shared_wo"), wi=self._param("shared_wi"),
                wi_0=self._param("shared_wi_0"), wi_1=self._param("shared_wi_1"),
                gate=None if shared_gate is None else shared_gate.kernel[...],
            )
        bias = getattr(self.gate, "bias", None)
        return pipeline.MoEWeights(
            router=self.gate.kernel[...], experts=self.expert_weights(),
            router_bias=None if bias is None else bias[...],
            selection_bias=self._param("selection_bias"), shared=shared,
        )

    def _param(self, name: str):
        v = getattr(self, name, None)
        return None if v is None else v[...]

    def _check_input(self, x) -> None:
        k = self.config.emb_dim
        if getattr(x, "ndim", None) != 3:
            raise ValueError(
                f"x: expected rank 3 [batch, seq, emb_dim={k}], got shape {getattr(x, 'shape', x)}"
            )
        if x.shape[-1] != k:
            raise ValueError(f"x: expected last dim emb_dim={k}, got shape {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x: expected a floating-point array, got dtype {x.dtype}")


def _to_tokens(x, mesh, batch_axes):
    """``x [B, S, K]`` -> ``[B*S, K]``. On a mesh with ``Explicit`` axes jax must be
    told where a reshape's result lives: the input goes onto the mesh (as it
    is, or replicated) and the tokens over the ``batch_axes`` that are
    ``Explicit``; the rest is placed by :meth:`Placement.run`."""
    b, s, k = x.shape
    explicit = _explicit_axes(mesh)
    if not explicit:
        return x.reshape(b * s, k)
    if not _explicit_axes(jax.typeof(x).sharding.mesh):
        x = jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
    kept = tuple(a for a in batch_axes if a in explicit)
    if (b * s) % math.prod(mesh.shape[a] for a in kept):  # padded later, in the pipeline
        kept = ()
    tokens = NamedSharding(mesh, PartitionSpec(kept or None))
    return jax.lax.reshape(x, (b * s, k), out_sharding=tokens)


def _from_tokens(out, x, mesh):
    """``out [B*S, K]`` -> ``[B, S, K]`` with ``x``'s sharding (on a mesh with
    ``Explicit`` axes; replicated when ``x`` had none)."""
    if not _explicit_axes(mesh):
        return out.reshape(x.shape)
    sharding = jax.typeof(x).sharding
    if not _explicit_axes(sharding.mesh):
        sharding = NamedSharding(mesh, PartitionSpec())
    return jax.lax.reshape(out, x.shape, out_sharding=sharding)


def _explicit_axes(mesh) -> tuple[str, ...]:
    if mesh is None:
        return ()
    return tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind == AxisType.Explicit)
