"""The decoder: embedding, blocks, final norm, LM head. One definition for the
toy model of ``fusedmoe train`` and every Hugging Face family.

``Decoder(ModelConfig(...), rngs=nnx.Rngs(0))(tokens [B, S] int) ->
(logits [B, S, vocab] f32, aux)``. Each block is pre-norm: RMSNorm, attention
(:data:`fusedmoe.model.attention.ATTENTIONS`), RMSNorm, then the feed-forward
network: :class:`fusedmoe.MoE` in MoE blocks, a dense gated FFN in the others
(the first ``n_dense_layers`` and any in ``dense_layers``). ``aux`` sums the
MoE layers' weighted ``aux_loss`` and stacks their ``load_balance_loss [L]``,
``router_z_loss [L]`` and ``tokens_per_expert [L, G]`` (``L`` = the number of
MoE blocks).

Generation runs over a KV cache: ``cache = model.init_cache(batch, capacity)``,
then ``logits, cache = model.decode(tokens, cache)`` once with the prompt (the
prefill) and once per new token (see :mod:`fusedmoe.generate`).
:func:`cache_bytes_per_token` says what each token costs that cache.

The MoE layer's ``fused_moe_mlp`` flag is the only difference between a fused
and an unfused model: built from the same seed both hold the same numbers, and
:func:`fusedmoe.checkpoint.fusion.fuse_state` / ``unfuse_state`` convert one's
``nnx.state(model).to_pure_dict()`` to the other's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fusedmoe.model.attention import ATTENTIONS
from fusedmoe.model.cache import Cache
from fusedmoe.model.config import ModelConfig
from fusedmoe.model.layers import DenseFFN, RMSNorm, normal_init
from fusedmoe.model.sharding import place_cache


class Block(nnx.Module):
    """Pre-norm attention, then a pre-norm MoE or dense FFN, each with a residual."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs, mesh=None):
        from fusedmoe.layer import MoE

        c = config
        pdt = c.moe.param_dtype
        self.is_moe = c.is_moe_layer(layer)
        self.attn_norm = RMSNorm(c.emb_dim, c.norm_eps, pdt)
        self.attn = ATTENTIONS[c.attention](c, layer, rngs=rngs, mesh=mesh)
        self.ffn_norm = RMSNorm(c.emb_dim, c.norm_eps, pdt)
        if self.is_moe:
            self.ffn = MoE(c.moe, rngs=rngs, mesh=mesh)
        else:
            self.ffn = DenseFFN(c, rngs=rngs, mesh=mesh)

    def __call__(self, x, positions, cache=None, *, cache_empty: bool = False):
        """``x [B, S, K]`` -> ``(x, aux or None, cache)``."""
        h, cache = self.attn(self.attn_norm(x), positions, cache, cache_empty=cache_empty)
        x = x + h
        if self.is_moe:
            y, aux = self.ffn(self.ffn_norm(x))
        else:
            y, aux = self.ffn(self.ffn_norm(x)), None
        return x + y, aux, cache


class Decoder(nnx.Module):
    """Decoder-only transformer with MoE feed-forward blocks. See the module docstring."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mesh=None):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        self.config = c = config
        self.mesh = mesh  # see fusedmoe.model.sharding
        pdt, dt = c.moe.param_dtype, c.moe.compute_dtype
        self.embed = nnx.Embed(c.vocab_size, c.emb_dim, dtype=dt, param_dtype=pdt,
                               embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
        self.blocks = nnx.List(
            [Block(c, i, rngs=rngs, mesh=mesh) for i in range(c.num_layers)]
        )
        self.final_norm = RMSNorm(c.emb_dim, c.norm_eps, pdt)
        if not c.tie_embeddings:
            self.unembed = nnx.Linear(c.emb_dim, c.vocab_size, use_bias=False, dtype=dt,
                                      param_dtype=pdt, kernel_init=normal_init(c.emb_dim**2),
                                      rngs=rngs)
        if mesh is not None:  # the MoE layers placed themselves; this places the rest
            from fusedmoe.model.sharding import place

            place(self, mesh)

    # ------------------------------------------------------------------ forward
    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``tokens [B, S]`` at positions ``0..S-1`` -> ``(logits [B, S, V] f32, aux)``."""
        self._check_tokens(tokens)
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"tokens: sequence length {tokens.shape[1]} exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )
        x = self.embed(tokens)
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        auxes = []
        for block in self.blocks:
            x, aux, _ = block(x, positions)
            if aux is not None:
                auxes.append(aux)
        return self._logits(x), self._stack_aux(auxes)

    def cache_bytes_per_token(self, dtype=None, *, expanded: bool = False) -> int:
        """See :func:`cache_bytes_per_token` (``dtype``: the model's compute dtype)."""
        return cache_bytes_per_token(self.config, dtype, expanded=expanded)

    def init_cache(self, batch: int, capacity: int, dtype=None) -> Cache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` tokens
        (sliding-window layers keep only their window). ``dtype`` defaults to the
        model's compute dtype. On a mesh the cache is placed there, its heads split
        as the attention's are."""
        for name, value in (("batch", batch), ("capacity", capacity)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        dtype = dtype or self.config.moe.compute_dtype
        layers = tuple(place_cache(block.attn.init_cache(batch, capacity, dtype),
                                   block.attn.cache_specs(), self.mesh)
                       for block in self.blocks)
        return Cache(layers=layers, length=jnp.zeros((), jnp.int32), empty=True)

    def decode(self, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Run ``tokens [B, S]`` at positions ``cache.length ..`` over ``cache``:
        ``(logits [B, S, V] f32, the cache with them written)``. The caller keeps
        ``cache.length + S`` within the capacity the cache was made for."""
        self._check_tokens(tokens)
        s = tokens.shape[1]
        positions = cache.length + jnp.arange(s, dtype=jnp.int32)
        x = self.embed(tokens)
        layers = []
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x, _, layer_cache = block(x, positions, layer_cache, cache_empty=cache.empty)
            layers.append(layer_cache)
        return self._logits(x), cache.advanced(layers, s)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_tokens(tokens) -> None:
        if getattr(tokens, "ndim", None) != 2:
            raise ValueError(
                f"tokens: expected rank 2 [batch, seq], got shape {getattr(tokens, 'shape', None)}"
            )
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens: expected integer token ids, got dtype {tokens.dtype}")

    def _logits(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = self.final_norm(x)
        if c.tie_embeddings:
            logits = jnp.einsum("bsk,vk->bsv", x, self.embed.embedding[...].astype(x.dtype),
                                preferred_element_type=jnp.float32)
            if c.scale_tied_logits:
                # Rows of the embedding have norm ~sqrt(K); the input token's own logit
                # starts high (~sqrt(K)), but 1/sqrt(K) learns much faster here than 1/K.
                logits = logits * c.emb_dim**-0.5
        else:
            logits = self.unembed(x)
        return logits.astype(jnp.float32)

    def _stack_aux(self, auxes: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
        if not auxes:
            g = self.config.moe.num_experts
            return {
                "aux_loss": jnp.zeros((), jnp.float32),
                "load_balance_loss": jnp.zeros((0,), jnp.float32),
                "router_z_loss": jnp.zeros((0,), jnp.float32),
                "tokens_per_expert": jnp.zeros((0, g), jnp.int32),
            }
        return {
            "aux_loss": sum(a["aux_loss"] for a in auxes),
            "load_balance_loss": jnp.stack([a["load_balance_loss"] for a in auxes]),
            "router_z_loss": jnp.stack([a["router_z_loss"] for a in auxes]),
            "tokens_per_expert": jnp.stack([a["tokens_per_expert"] for a in auxes]),
        }


MoEModel = Decoder  # the name fusedmoe train and older code use


def cache_bytes_per_token(config: ModelConfig, dtype=None, *, expanded: bool = False) -> int:
    """Bytes one more token of one sequence adds to the KV cache of a model of
    ``config`` (all layers; a sliding layer stops growing once its window is full),
    with the cache in ``dtype`` (default: the compute dtype). ``expanded``: what
    caching full keys and values would take instead (multi-head latent attention
    caches its latent; for the other kinds it is the same number). Slot positions
    (4 bytes per slot and layer, shared by the batch) are not counted.
    Computed from the shapes alone: nothing is built."""
    itemsize = jnp.dtype(dtype or config.moe.compute_dtype).itemsize
    width = ATTENTIONS[config.attention].cache_width(config, expanded=expanded)
    return config.num_layers * width * itemsize


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of ``logits [B, S, V]`` against ``targets [B, S]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
