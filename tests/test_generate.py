"""The KV cache and generation on models built here (no transformers needed):
cached decoding gives the full forward's logits, sliding layers keep only their
window, greedy generation is the argmax chain, sampling follows its rules, and
the decode step compiles once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusedmoe import MoEConfig
from fusedmoe.generate import Sampling, _jitted, generate, sample
from fusedmoe.model import SLIDING, Decoder, ModelConfig, RopeScaling
from model_helpers import decode_in_chunks, forward

MOE = MoEConfig(num_experts=4, num_experts_per_tok=2, emb_dim=32, mlp_dim=16)
# Every attention option at once: 4 query heads over 2 key/value heads of 16, biases,
# per-head q/k norms, clip, a window of 5 on layer 0 only, yarn RoPE, a dense layer 1.
CFG = ModelConfig(
    moe=MOE, vocab_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
    max_seq_len=64, fused_qkv=False, qkv_bias=True, out_bias=True, qk_norm="head",
    clip_qkv=3.0, sliding_window=5, layer_types=(SLIDING, "full_attention", "full_attention"),
    rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=8),
    dense_layers=(1,), dense_mlp_dim=24,
)
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def model():
    return Decoder(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def full_logits(model):
    return np.asarray(forward(model, TOKENS))


@pytest.mark.parametrize("chunks", [[7] + [1] * 9, [3, 6, 1, 6], [16]],
                         ids=["prefill+steps", "chunks-past-the-window", "prefill-only"])
def test_cached_decoding_gives_the_full_forward(model, full_logits, chunks):
    got, cache = decode_in_chunks(model, TOKENS, chunks, capacity=20)
    np.testing.assert_allclose(np.asarray(got), full_logits, rtol=1e-5, atol=1e-5)
    assert int(cache.length) == 16 and not cache.empty
    sliding, full = cache.layers[0], cache.layers[1]
    assert sliding.k.shape[1] == 5 and full.k.shape[1] == 20  # the ring keeps the window
    # the ring holds the last 5 positions, each in slot position % 5
    assert sorted(np.asarray(sliding.pos).tolist()) == list(range(11, 16))
    assert all(p % 5 == slot for slot, p in enumerate(np.asarray(sliding.pos)))
    assert np.asarray(full.pos).tolist() == list(range(16)) + [-1] * 4


def test_the_window_and_the_options_matter(model, full_logits):
    """The model above would give other logits without its window or clip."""
    for change in (dict(sliding_window=0, layer_types=()), dict(clip_qkv=0.0)):
        other = Decoder(CFG.replace(**change), rngs=nnx.Rngs(0))
        assert np.abs(np.asarray(forward(other, TOKENS)) - full_logits).max() > 1e-3


def test_greedy_generation_is_the_argmax_chain(model):
    prompt = TOKENS[:, :6]
    step = _jitted("step")
    before = step._cache_size()
    out = np.asarray(generate(model, prompt, 10))
    assert out.shape == (2, 16) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :6], prompt)
    # The model is causal, so one forward pass over the output, no cache, gives the
    # logits each step saw: every new token is the argmax of the position before it.
    logits = np.asarray(forward(model, jnp.asarray(out)))
    np.testing.assert_array_equal(out[:, 6:], logits[:, 5:-1].argmax(-1))
    assert step._cache_size() - before == 1  # nine decode steps, one compilation
    generate(model, TOKENS[:, :4], 12)  # another prompt of the same total: no new step
    assert step._cache_size() - before == 1


def test_sampling_rules():
    key = jax.random.key(0)
    logits = jnp.log(jnp.array([[0.2, 0.3, 0.5, 1e-9]] * 400))
    one = jnp.float32(1.0)

    def drawn(rule):
        return set(np.asarray(sample(logits, key, one, rule)).tolist())

    assert drawn(Sampling(True, None, None)) == {2}
    assert drawn(Sampling(False, None, None)) == {0, 1, 2}
    assert drawn(Sampling(False, 2, None)) == {1, 2}
    assert drawn(Sampling(False, None, 0.6)) == {1, 2}  # 0.5 + 0.3 reach 0.6
    assert drawn(Sampling(False, None, 0.5)) == {2}  # the most likely token alone reaches 0.5
    assert drawn(Sampling(False, 1, None)) == {2}


def test_sampled_generation():
    model = Decoder(ModelConfig(moe=MOE, vocab_size=64, num_layers=1, num_heads=2),
                    rngs=nnx.Rngs(1))
    prompt = TOKENS[:, :5]
    greedy = np.asarray(generate(model, prompt, 6))
    np.testing.assert_array_equal(np.asarray(generate(model, prompt, 6, temperature=0.7,
                                                      top_k=1)), greedy)
    a = np.asarray(generate(model, prompt, 6, temperature=5.0, seed=1))
    np.testing.assert_array_equal(a, np.asarray(generate(model, prompt, 6, temperature=5.0,
                                                         seed=1)))
    assert not np.array_equal(a, np.asarray(generate(model, prompt, 6, temperature=5.0, seed=2)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(prompt=np.zeros((3,), np.int32)), ValueError, "prompt: expected token ids"),
        (dict(prompt=np.zeros((1, 3), np.float32)), TypeError, "integer token ids"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens: expected an int >= 1"),
        (dict(temperature=-1.0), ValueError, "temperature: expected a number >= 0"),
        (dict(top_k=65), ValueError, r"top_k: expected None or an int in 1..64"),
        (dict(top_p=0.0), ValueError, r"top_p: expected None or a number in \(0, 1\]"),
        (dict(model="not a model"), TypeError, "model: expected a fusedmoe.model.Decoder"),
        (dict(eos_token_id=64), ValueError, r"eos_token_id: expected None, a token id or a "
                                            r"list of them, each in 0..63, got 64"),
        (dict(eos_token_id=[1, -1]), ValueError, r"eos_token_id: .*got \[1, -1\]"),
        (dict(eos_token_id=1, pad_token_id=[0]), ValueError,
         r"pad_token_id: expected None or one token id, got \[0\]"),
    ],
)
def test_generate_errors(model, kwargs, error, match):
    args = dict(model=model, prompt=TOKENS[:, :3], max_new_tokens=2) | kwargs
    if isinstance(args["model"], str):
        args["model"] = object()
    with pytest.raises(error, match=match):
        generate(args.pop("model"), args.pop("prompt"), **args)
