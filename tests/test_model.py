"""The small MoE language model: shapes, causality, fused == unfused, config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusedmoe import MoEConfig
from fusedmoe.checkpoint.fusion import unfuse_state
from fusedmoe.model import ModelConfig, MoEModel, RopeScaling, cross_entropy

MOE = MoEConfig(num_experts=4, num_experts_per_tok=2, emb_dim=16, mlp_dim=16,
                fused_moe_mlp=True, load_balance_loss_weight=0.01)
CFG = ModelConfig(moe=MOE, num_layers=2, num_heads=2, max_seq_len=12, n_dense_layers=1)


@pytest.fixture(scope="module")
def model():
    return MoEModel(CFG, rngs=nnx.Rngs(0))


def jit_forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda tokens: nnx.merge(graphdef, state)(tokens))


@pytest.fixture(scope="module")
def forward(model):
    return jit_forward(model)


def test_shapes_and_aux(forward):
    tokens = jnp.arange(2 * 12, dtype=jnp.int32).reshape(2, 12)
    logits, aux = forward(tokens)
    assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # one MoE block (the first is dense): every routed (token, slot) pair is counted
    assert aux["tokens_per_expert"].shape == (1, 4)
    assert int(aux["tokens_per_expert"].sum()) == 2 * 12 * 2
    assert aux["load_balance_loss"].shape == (1,)
    np.testing.assert_allclose(aux["aux_loss"], 0.01 * aux["load_balance_loss"][0], rtol=1e-6)
    loss = cross_entropy(logits[:, :-1], tokens[:, 1:])
    assert 4.0 < float(loss) < 8.0  # about log(256) at initialisation


def test_causal(forward):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(2, 12)).astype(np.int32)
    changed = tokens.copy()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    a, _ = forward(jnp.asarray(tokens))
    b, _ = forward(jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))


def test_fused_and_unfused_models_agree(model, forward):
    unfused = MoEModel(CFG.with_moe(fused_moe_mlp=False), rngs=nnx.Rngs(0))
    fused_state = nnx.state(model).to_pure_dict()
    unfused_state = nnx.state(unfused).to_pure_dict()
    # same seed -> same numbers; the converter maps one layout onto the other
    jax.tree.map(np.testing.assert_array_equal, unfuse_state(fused_state), unfused_state)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)), jnp.int32)
    a, _ = forward(tokens)
    b, _ = jit_forward(unfused)(tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_tied_embeddings_and_all_moe():
    cfg = CFG.replace(tie_embeddings=True, n_dense_layers=0)
    m = nnx.eval_shape(lambda: MoEModel(cfg, rngs=nnx.Rngs(1)))  # shapes only
    assert not hasattr(m, "unembed")
    graphdef, state = nnx.split(m)
    logits, aux = jax.eval_shape(lambda st, t: nnx.merge(graphdef, st)(t), state,
                                 jnp.zeros((1, 5), jnp.int32))
    assert logits.shape == (1, 5, 256) and aux["tokens_per_expert"].shape == (2, 4)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(num_heads=3), "num_heads: 3 does not divide moe.emb_dim=16"),
        (dict(num_heads=16), "head_dim .* must be even"),
        (dict(n_dense_layers=3), "n_dense_layers: 3 is more than num_layers=2"),
        (dict(num_layers=0), "num_layers: expected an int >= 1, got 0"),
        (dict(vocab_size=1.5), "vocab_size: expected an int >= 1"),
        (dict(rope_theta=-1.0), "rope_theta: expected a number > 0"),
        (dict(num_kv_heads=3), "num_kv_heads: 3 does not divide num_heads=2"),
        (dict(head_dim=7), "head_dim 7 must be even"),
        (dict(qk_norm="layer"), "qk_norm: got 'layer'"),
        (dict(qk_norm="head"), "qk_norm: needs fused_qkv=False"),
        (dict(attention="mha"), "attention: got 'mha', expected one of"),
        (dict(clip_qkv=-1.0), "clip_qkv: expected a number >= 0"),
        (dict(layer_types=("full_attention",)), "layer_types: 1 entries for num_layers=2"),
        (dict(layer_types=("sliding_attention", "full_attention")),
         "a sliding_attention layer needs sliding_window > 0"),
        (dict(layer_types=("full", "full")), "layer_types: unknown"),
        (dict(dense_layers=(2,)), r"dense_layers: \[2\] are not layers 0..1"),
        (dict(hf_extra="[1]"), "hf_extra: expected a JSON object"),
    ],
)
def test_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**changes)


def test_config_type_errors_and_dict_roundtrip():
    with pytest.raises(TypeError, match="moe: expected a MoEConfig"):
        ModelConfig(moe={"emb_dim": 16})
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG
    # the fields the Hugging Face families use survive a JSON round trip too
    rich = CFG.replace(num_kv_heads=1, head_dim=8, fused_qkv=False, qk_norm="full",
                       sliding_window=4, layer_types=("sliding_attention", "full_attention"),
                       rope_scaling=RopeScaling("yarn", factor=4.0,
                                                original_max_position_embeddings=8),
                       dense_layers=(1,), hf_extra='{"eos_token_id": 2}')
    again = ModelConfig.from_dict(json.loads(json.dumps(rich.to_dict())))
    assert again == rich and hash(again) == hash(rich)
    assert rich.moe_layers == [] and rich.window(0) == 4 and rich.window(1) == 0
    with pytest.raises(ValueError, match="rope_scaling.rope_type: got 'ntk'"):
        RopeScaling("ntk")
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"layers": 2})


def test_input_errors(model):
    with pytest.raises(ValueError, match="tokens: expected rank 2"):
        model(jnp.zeros((12,), jnp.int32))
    with pytest.raises(TypeError, match="integer token ids"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="exceeds max_seq_len=12"):
        model(jnp.zeros((1, 13), jnp.int32))
