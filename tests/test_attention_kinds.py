"""The attention kinds beyond grouped-query attention, without transformers: the
sink softmax and the interleaved rotation against NumPy, multi-head latent
attention's absorbed decode step against its expanded form, and the config
fields that shape them (validated, kept through a JSON round trip)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusedmoe import MoEConfig
from fusedmoe.model import ModelConfig, MultiHeadLatentAttention, cache_bytes_per_token
from fusedmoe.model.rope import apply_rotary
from fusedmoe.model.softmax_attention import attend

MOE = MoEConfig(num_experts=4, num_experts_per_tok=2, emb_dim=32, mlp_dim=16)
MLA = ModelConfig(moe=MOE, vocab_size=64, num_layers=2, num_heads=4, attention="mla",
                  q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=6, rope_interleave=True, max_seq_len=32)


def test_sinks_join_the_softmax():
    """Each head's sink logit is one more entry of its softmax, then dropped: NumPy,
    with grouped queries (4 heads over 2 key heads) and a causal mask."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=shape).astype(np.float32)
               for shape in ((1, 5, 4, 8), (1, 5, 2, 8), (1, 5, 2, 3)))
    sinks = rng.normal(size=4).astype(np.float32)
    pos = jnp.arange(5)
    got = np.asarray(attend(q, k, v, pos, pos, scale=0.5, sinks=jnp.asarray(sinks)))
    want = np.zeros((1, 5, 4, 3), np.float64)
    for h in range(4):
        for s in range(5):
            logits = [0.5 * q[0, s, h] @ k[0, t, h // 2] for t in range(s + 1)] + [sinks[h]]
            p = np.exp(np.array(logits) - max(logits))
            p /= p.sum()
            want[0, s, h] = p[:-1] @ v[0, :s + 1, h // 2]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    plain = np.asarray(attend(q, k, v, pos, pos, scale=0.5))
    assert np.abs(plain - got).max() > 1e-2  # the sinks take weight away


def test_interleaved_rotation():
    """Pairs (x0, x1), (x2, x3): rotated by one angle each, returned as halves."""
    x = np.random.default_rng(1).normal(size=(1, 3, 1, 6)).astype(np.float32)
    angles = np.random.default_rng(2).normal(size=(3, 3)).astype(np.float32)
    got = np.asarray(apply_rotary(x, jnp.cos(angles), jnp.sin(angles), interleaved=True))
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    want = np.concatenate([even * c - odd * s, odd * c + even * s], axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_absorbed_decode_equals_expanded_attention():
    """A one-token step reads the cached latents without expanding them: the same
    output as expanding them into keys and values."""
    graphdef, state = nnx.split(MultiHeadLatentAttention(MLA, 1, rngs=nnx.Rngs(0)))

    @jax.jit
    def run(x):
        attn = nnx.merge(graphdef, state)
        positions = jnp.arange(7, dtype=jnp.int32)
        cache = attn.init_cache(2, 8, jnp.float32)
        _, cache = attn(x[:, :6], positions[:6], cache, cache_empty=True)
        step, _ = attn(x[:, 6:], positions[6:], cache)
        full, _ = attn(x, positions)  # no cache: the expanded form
        return step, full

    step, full = run(jax.random.normal(jax.random.key(0), (2, 7, 32)))
    np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, 6:]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(kv_lora_rank=0), "kv_lora_rank: expected an int >= 1, got 0"),
        (dict(qk_rope_head_dim=5), "qk_rope_head_dim: 5 must be even"),
        (dict(q_lora_rank=-1), "q_lora_rank: expected an int >= 0"),
        (dict(head_dim=16), "head_dim: 16 has no meaning for attention='mla'"),
        (dict(num_kv_heads=2), "num_kv_heads: 2; attention='mla' computes keys and values"),
        (dict(attention="gqa"), "q_lora_rank: applies to attention='mla' only"),
        (dict(attention="gqa_sinks", q_lora_rank=0, kv_lora_rank=0, qk_nope_head_dim=0,
              qk_rope_head_dim=0, v_head_dim=0), "rope_interleave: applies to attention='mla'"),
    ],
)
def test_mla_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        MLA.replace(**changes)


def test_mla_config_round_trip_and_cache_width():
    again = ModelConfig.from_dict(json.loads(json.dumps(MLA.to_dict())))
    assert again == MLA and again.qk_head_dim == 12
    assert cache_bytes_per_token(MLA) == 2 * (16 + 4) * 4
    assert cache_bytes_per_token(MLA, "bfloat16", expanded=True) == 2 * 4 * (12 + 6) * 2
