"""The decoder's small building blocks: RMSNorm and the dense gated FFN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fusedmoe.experts import dense_ffn, gated_activation
from fusedmoe.model.config import ModelConfig


def normal_init(fan_in: int):
    """Normal with standard deviation ``fan_in ** -0.5``."""
    return nnx.initializers.normal(fan_in**-0.5)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis, in float32; ``x``'s dtype out."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class DenseFFN(nnx.Module):
    """A dense gated FFN, ``act(x @ gate) * (x @ up) @ w_out``, for the blocks that
    are not MoE. Gate and up are stored fused as ``w_in [K, 2, N]`` (``w_out [N, K]``)
    in fused and unfused models alike, so the MoE converters leave it alone."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        k, n, pdt = c.emb_dim, c.ffn_dim, c.moe.param_dtype
        self.activation = c.moe.mlp_activations
        self.dtype = c.moe.compute_dtype
        self.w_in = nnx.Param(normal_init(k)(rngs.params(), (k, 2, n), pdt))
        self.w_out = nnx.Param(normal_init(n * 2 * c.num_layers)(rngs.params(), (n, k), pdt))

    def __call__(self, x):
        b, s, k = x.shape
        act = lambda g, u: gated_activation(g, u, self.activation)
        y = dense_ffn(x.reshape(b * s, k).astype(self.dtype), self.w_in[...].astype(self.dtype),
                      self.w_out[...].astype(self.dtype), act)
        return y.reshape(b, s, k).astype(x.dtype)
