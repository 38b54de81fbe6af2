"""``MoE``: the Flax NNX module that owns the parameters and calls the pure
functions of :mod:`routing`, :mod:`dispatch` and :mod:`experts`.

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

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from fusedmoe import dispatch, experts, parallel, routing
from fusedmoe.config import MoEConfig


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
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, mesh=None):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
        if mesh is not None:  # data/expert/tensor parallelism: see fusedmoe.parallel
            parallel.validate_mesh(config, mesh)
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
            parallel.shard_module(self, mesh)

    @classmethod
    def from_state(cls, config: MoEConfig, state) -> MoE:
        """A layer of ``config`` holding ``state`` (a nested dict of arrays, fused or
        unfused: converted to ``config``'s layout), with no random initialisation."""
        from fusedmoe.checkpoint.state import module_from_state

        return module_from_state(lambda: cls(config, rngs=nnx.Rngs(0)), state)

    # ------------------------------------------------------------------ helpers
    def _param(self, name: str):
        v = getattr(self, name, None)
        return None if v is None else v[...]

    def _activation(self):
        c = self.config
        return partial(
            experts.gated_activation, kind=c.mlp_activations,
            swiglu_alpha=c.swiglu_alpha, swiglu_limit=c.swiglu_limit,
        )

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

    # ------------------------------------------------------------------ forward
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        self._check_input(x)
        c = self.config
        b, s, k = x.shape
        tokens = x.reshape(b * s, k).astype(c.compute_dtype)
        if self.mesh is not None:
            tokens = parallel.constrain_tokens(tokens, c, self.mesh)
        logits = self.gate(tokens)
        route = routing.route if self.mesh is None else parallel.route_fn(c, self.mesh)
        chosen = route(
            logits, k=c.num_experts_per_tok, score_func=c.score_func,
            softmax_after_topk=c.softmax_after_topk, norm_topk_prob=c.norm_topk_prob,
            routed_scaling_factor=c.routed_scaling_factor,
            selection_bias=self._param("selection_bias"),
            n_groups=c.n_routing_groups, top_groups=c.topk_routing_group,
        )
        dropped = jnp.zeros((), jnp.int32)
        if c.sparse_matmul and self.mesh is not None:
            out, dropped = parallel.sparse_moe(
                tokens, chosen.experts, chosen.weights, self.expert_weights(),
                self._activation(), c, self.mesh,
            )
        elif c.sparse_matmul:
            out = self._sparse(tokens, chosen)
        else:
            out, dropped = self._dense(tokens, chosen)
        if c.shared_mlp_dim:
            out = out + self._shared(tokens)
        aux = self._aux(logits, chosen)
        aux["dropped_rows"] = dropped  # (token, slot) rows past a capacity; 0 when dropless
        return out.reshape(b, s, k).astype(x.dtype), aux

    def expert_weights(self) -> experts.ExpertWeights:
        """The routed experts' weights as arrays in the compute dtype."""
        dt = self.config.compute_dtype
        names = experts.ExpertWeights._fields
        return experts.ExpertWeights(
            **{n: None if (v := self._param(n)) is None else v.astype(dt) for n in names}
        )

    def _sparse(self, tokens, chosen: routing.Routing):
        c = self.config
        rows = dispatch.sort_by_expert(tokens, chosen.experts, c.num_experts)
        y = experts.expert_ffn(
            rows.rows, rows.group_sizes, rows.row_experts, self.expert_weights(),
            self._activation(), backend=c.gmm_backend,
        )
        return dispatch.unsort_and_combine(y, rows, chosen.weights, c.float32_weight_sum)

    def _dense(self, tokens, chosen: routing.Routing):
        c = self.config
        dt = c.compute_dtype
        capacity = dispatch.expert_capacity(
            tokens.shape[0], c.num_experts_per_tok, c.num_experts, c.capacity_factor
        )
        dispatch_mask, combine = dispatch.dispatch_masks(
            chosen.experts, chosen.weights, c.num_experts, capacity
        )
        xe = jnp.einsum("tec,tk->eck", dispatch_mask.astype(dt), tokens)
        gate = jnp.einsum("eck,ekn->ecn", xe, self.wi_0[...].astype(dt))
        up = jnp.einsum("eck,ekn->ecn", xe, self.wi_1[...].astype(dt))
        if c.mlp_bias:
            gate = gate + self.wi_0_bias[...][:, None].astype(dt)
            up = up + self.wi_1_bias[...][:, None].astype(dt)
        act = self._activation()(gate, up)
        y = jnp.einsum("ecn,enk->eck", act, self.wo[...].astype(dt))
        if c.mlp_bias:
            y = y + self.wo_bias[...][:, None].astype(dt)
        sum_dtype = jnp.float32 if c.float32_weight_sum else dt
        out = jnp.einsum("tec,eck->tk", combine.astype(sum_dtype), y.astype(sum_dtype))
        dropped = chosen.experts.size - jnp.sum(dispatch_mask, dtype=jnp.int32)
        return out.astype(dt), dropped

    def _shared(self, tokens):
        dt = self.config.compute_dtype
        if self.config.fused_moe_mlp:
            wi = self.shared_wi[...]
        else:
            wi = jnp.stack([self.shared_wi_0[...], self.shared_wi_1[...]], axis=1)
        y = experts.dense_ffn(tokens, wi.astype(dt), self.shared_wo[...].astype(dt),
                              self._activation())
        if self.config.shared_expert_gate:
            y = y * jax.nn.sigmoid(self.shared_gate(tokens)).astype(dt)
        return y

    def _aux(self, logits, chosen: routing.Routing) -> dict[str, jax.Array]:
        c = self.config
        balance = routing.load_balance_loss(chosen.scores, chosen.experts, c.num_experts)
        z = routing.router_z_loss(logits)
        return {
            "load_balance_loss": balance,
            "router_z_loss": z,
            "aux_loss": c.load_balance_loss_weight * balance + c.router_z_loss_weight * z,
            "tokens_per_expert": routing.tokens_per_expert(chosen.experts, c.num_experts),
        }
