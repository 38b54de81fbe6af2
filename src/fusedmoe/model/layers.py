"""The decoder's small building blocks: RMSNorm, a linear map on arrays, and the
dense gated FFN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fusedmoe.experts import dense_ffn, gated_activation
from fusedmoe.model.config import ModelConfig
from fusedmoe.model.sharding import TensorSplit, tensor_split


def normal_init(fan_in: int):
    """Normal with standard deviation ``fan_in ** -0.5``."""
    return nnx.initializers.normal(fan_in**-0.5)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
    """``x [..., I] @ kernel [I, O] + bias [O]`` in ``dtype``, as ``nnx.Linear`` computes it."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias.astype(dtype)


def row_split_linear(layer: nnx.Linear, x: jax.Array, split: TensorSplit) -> jax.Array:
    """``layer(x)`` where ``x [..., I/n]`` and ``layer``'s kernel rows are this device's
    slice of a split over ``split``'s ``n`` devices (an output projection of its own
    heads): the partial products summed over the devices, the bias added once."""
    y = split.sum(linear(x, layer.kernel[...], None, layer.dtype))
    return y if layer.bias is None else y + layer.bias[...].astype(layer.dtype)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis, in float32; ``x``'s dtype out."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x, split: TensorSplit | None = None):
        """``split``: the last axis (and ``scale``) is this device's equal slice of a
        width split over ``split``'s devices; the mean square is the whole width's."""
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        if split is not None and split.axis:
            mean_square = split.sum(mean_square) / split.size
        y = x32 * jax.lax.rsqrt(mean_square + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class DenseFFN(nnx.Module):
    """A dense gated FFN, ``act(x @ gate) * (x @ up) @ w_out``, for the blocks that
    are not MoE. Gate and up are stored fused as ``w_in [K, 2, N]`` (``w_out [N, K]``)
    in fused and unfused models alike, so the MoE converters leave it alone.

    On a mesh the width ``N`` is split over the tensor axis (when it divides ``N``):
    each device computes its ``N/tp`` slice and the partial outputs are summed
    (:mod:`fusedmoe.model.sharding`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        c = config
        k, n, pdt = c.emb_dim, c.ffn_dim, c.moe.param_dtype
        self.activation = c.moe.mlp_activations
        self.dtype = c.moe.compute_dtype
        self.width = tensor_split(c, mesh, n)
        self.w_in = nnx.Param(normal_init(k)(rngs.params(), (k, 2, n), pdt))
        self.w_out = nnx.Param(normal_init(n * 2 * c.num_layers)(rngs.params(), (n, k), pdt))

    def param_specs(self) -> dict[tuple[str, ...], P]:
        t = self.width.axis
        return {("w_in",): P(None, None, t), ("w_out",): P(t, None)}

    def __call__(self, x):
        """``x [B, S, K]`` -> ``[B, S, K]``."""
        return self.width.run(self, DenseFFN.per_device, (x,), (P(),), P())

    def per_device(self, x):
        b, s, k = x.shape
        act = lambda g, u: gated_activation(g, u, self.activation)
        y = dense_ffn(x.reshape(b * s, k).astype(self.dtype), self.w_in[...].astype(self.dtype),
                      self.w_out[...].astype(self.dtype), act)
        return self.width.sum(y).reshape(b, s, k).astype(x.dtype)
