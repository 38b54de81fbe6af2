"""A small decoder-only MoE language model built on :class:`fusedmoe.MoE`.

``MoEModel(ModelConfig(...), rngs=nnx.Rngs(0))(tokens [B, S] int) ->
(logits [B, S, vocab] f32, aux)``. Each block is pre-norm: RMSNorm, rotary
causal self-attention, RMSNorm, then the feed-forward network — a dense gated
FFN in the first ``n_dense_layers`` blocks, the :class:`fusedmoe.MoE` layer in
the others. ``aux`` sums the MoE layers' weighted ``aux_loss`` and stacks
their ``load_balance_loss [L]`` and ``tokens_per_expert [L, G]`` (``L`` = the
number of MoE blocks).

The MoE layer's ``fused_moe_mlp`` flag is the only difference between a fused
and an unfused model: built from the same seed both hold the same numbers, and
:func:`fusedmoe.checkpoint.fusion.fuse_state` / ``unfuse_state`` convert one's
``nnx.state(model).to_pure_dict()`` to the other's. (The dense FFN stores its
weights as ``w_in [K, 2, N]`` and ``w_out [N, K]`` in both, so the converters
leave it alone.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fusedmoe.config import FLOAT_DTYPES, MoEConfig, check_ints_at_least
from fusedmoe.experts import dense_ffn, gated_activation


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of :class:`MoEModel`. ``moe.emb_dim`` is the model width."""

    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    vocab_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    max_seq_len: int = 128
    n_dense_layers: int = 0  # the first this-many blocks use a dense gated FFN
    dense_mlp_dim: int = 0  # 0 = moe.num_experts_per_tok * moe.mlp_dim (same active FLOPs)
    tie_embeddings: bool = False  # True: logits = h @ embedding.T / sqrt(K)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def emb_dim(self) -> int:
        return self.moe.emb_dim

    @property
    def head_dim(self) -> int:
        return self.moe.emb_dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return self.dense_mlp_dim or self.moe.num_experts_per_tok * self.moe.mlp_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.n_dense_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_moe(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, moe=self.moe.replace(**changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        if not isinstance(values, dict):
            raise TypeError(f"ModelConfig: expected a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"ModelConfig: unknown field(s) {unknown}; valid fields: {', '.join(sorted(known))}"
            )
        values = dict(values)
        if isinstance(values.get("moe"), dict):
            values["moe"] = MoEConfig.from_dict(values["moe"])
        return cls(**values)


def _validate(c: ModelConfig) -> None:
    if not isinstance(c.moe, MoEConfig):
        raise TypeError(f"moe: expected a MoEConfig, got {type(c.moe).__name__}")
    check_ints_at_least(c, ("vocab_size", "num_layers", "num_heads", "max_seq_len"), 1)
    check_ints_at_least(c, ("n_dense_layers", "dense_mlp_dim"), 0)
    if c.n_dense_layers > c.num_layers:
        raise ValueError(
            f"n_dense_layers: {c.n_dense_layers} is more than num_layers={c.num_layers}"
        )
    if c.moe.emb_dim % c.num_heads:
        raise ValueError(
            f"num_heads: {c.num_heads} does not divide moe.emb_dim={c.moe.emb_dim}"
        )
    if c.head_dim % 2:
        raise ValueError(
            f"num_heads: head_dim = moe.emb_dim / num_heads = {c.head_dim} must be even for "
            "rotary embeddings"
        )
    for name in ("rope_theta", "norm_eps"):
        value = getattr(c, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    if not isinstance(c.tie_embeddings, bool):
        raise TypeError(f"tie_embeddings: expected bool, got {c.tie_embeddings!r}")
    if c.moe.dtype not in FLOAT_DTYPES:  # already checked by MoEConfig; kept for clarity
        raise ValueError(f"moe.dtype: got {c.moe.dtype!r}, expected one of {FLOAT_DTYPES}")


# ---------------------------------------------------------------------- modules
def _normal_init(fan_in: int):
    return nnx.initializers.normal(fan_in**-0.5)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding on ``x [B, S, H, D]`` (halves rotated, GPT-NeoX style)."""
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [S, D/2]
    sin = jnp.sin(angles)[None, :, None, :]
    cos = jnp.cos(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention with rotary positions."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        k, pdt, dt = c.emb_dim, c.moe.param_dtype, c.moe.compute_dtype
        self.num_heads, self.head_dim, self.theta = c.num_heads, c.head_dim, c.rope_theta
        lin = dict(use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.qkv = nnx.Linear(k, 3 * k, kernel_init=_normal_init(k), **lin)
        self.out = nnx.Linear(k, k, kernel_init=_normal_init(k * 2 * c.num_layers), **lin)

    def __call__(self, x):
        b, s, k = x.shape
        h, d = self.num_heads, self.head_dim
        q, kk, v = jnp.split(self.qkv(x).reshape(b, s, 3, h, d), 3, axis=2)
        q, kk, v = q[:, :, 0], kk[:, :, 0], v[:, :, 0]
        positions = jnp.arange(s)
        q, kk = rotary(q, positions, self.theta), rotary(kk, positions, self.theta)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, kk, preferred_element_type=jnp.float32)
        scores = scores * d**-0.5
        causal = jnp.tril(jnp.ones((s, s), bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, k)
        return self.out(y)


class DenseFFN(nnx.Module):
    """A dense gated FFN (``act(x @ gate) * (x @ up) @ w_out``) for the first blocks."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        k, n, pdt = c.emb_dim, c.ffn_dim, c.moe.param_dtype
        self.activation = c.moe.mlp_activations
        self.dtype = c.moe.compute_dtype
        self.w_in = nnx.Param(_normal_init(k)(rngs.params(), (k, 2, n), pdt))
        self.w_out = nnx.Param(_normal_init(n * 2 * c.num_layers)(rngs.params(), (n, k), pdt))

    def __call__(self, x):
        b, s, k = x.shape
        act = lambda g, u: gated_activation(g, u, self.activation)
        y = dense_ffn(x.reshape(b * s, k).astype(self.dtype), self.w_in[...].astype(self.dtype),
                      self.w_out[...].astype(self.dtype), act)
        return y.reshape(b, s, k).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, moe: bool, *, rngs: nnx.Rngs):
        from fusedmoe.layer import MoE

        c = config
        pdt = c.moe.param_dtype
        self.is_moe = moe
        self.attn_norm = RMSNorm(c.emb_dim, c.norm_eps, pdt)
        self.attn = Attention(c, rngs=rngs)
        self.ffn_norm = RMSNorm(c.emb_dim, c.norm_eps, pdt)
        self.ffn = MoE(c.moe, rngs=rngs) if moe else DenseFFN(c, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        if self.is_moe:
            y, aux = self.ffn(self.ffn_norm(x))
        else:
            y, aux = self.ffn(self.ffn_norm(x)), None
        return x + y, aux


class MoEModel(nnx.Module):
    """Decoder-only MoE transformer. See the module docstring."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        self.config = c = config
        pdt, dt = c.moe.param_dtype, c.moe.compute_dtype
        self.embed = nnx.Embed(c.vocab_size, c.emb_dim, dtype=dt, param_dtype=pdt,
                               embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.blocks = nnx.List(
            [Block(c, moe=i >= c.n_dense_layers, rngs=rngs) for i in range(c.num_layers)]
        )
        self.final_norm = RMSNorm(c.emb_dim, c.norm_eps, pdt)
        if not c.tie_embeddings:
            self.unembed = nnx.Linear(c.emb_dim, c.vocab_size, use_bias=False, dtype=dt,
                                      param_dtype=pdt, kernel_init=_normal_init(c.emb_dim**2),
                                      rngs=rngs)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        c = self.config
        if getattr(tokens, "ndim", None) != 2:
            raise ValueError(
                f"tokens: expected rank 2 [batch, seq], got shape {getattr(tokens, 'shape', None)}"
            )
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens: expected integer token ids, got dtype {tokens.dtype}")
        if tokens.shape[1] > c.max_seq_len:
            raise ValueError(
                f"tokens: sequence length {tokens.shape[1]} exceeds max_seq_len={c.max_seq_len}"
            )
        x = self.embed(tokens)
        auxes = []
        for block in self.blocks:
            x, aux = block(x)
            if aux is not None:
                auxes.append(aux)
        x = self.final_norm(x)
        if c.tie_embeddings:
            logits = jnp.einsum("bsk,vk->bsv", x, self.embed.embedding[...].astype(x.dtype),
                                preferred_element_type=jnp.float32)
            # Rows of the embedding have norm ~sqrt(K); the input token's own logit
            # starts high (~sqrt(K)), but 1/sqrt(K) learns much faster here than 1/K.
            logits = logits * c.emb_dim**-0.5
        else:
            logits = self.unembed(x).astype(jnp.float32)
        g = c.moe.num_experts
        if auxes:
            aux = {
                "aux_loss": sum(a["aux_loss"] for a in auxes),
                "load_balance_loss": jnp.stack([a["load_balance_loss"] for a in auxes]),
                "router_z_loss": jnp.stack([a["router_z_loss"] for a in auxes]),
                "tokens_per_expert": jnp.stack([a["tokens_per_expert"] for a in auxes]),
            }
        else:
            aux = {
                "aux_loss": jnp.zeros((), jnp.float32),
                "load_balance_loss": jnp.zeros((0,), jnp.float32),
                "router_z_loss": jnp.zeros((0,), jnp.float32),
                "tokens_per_expert": jnp.zeros((0, g), jnp.int32),
            }
        return logits.astype(jnp.float32), aux


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of ``logits [B, S, V]`` against ``targets [B, S]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
