"""The MoE layer: fused vs unfused, sparse vs dense, every backend, against a
slow NumPy reference; gradients; program structure; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusedmoe import MoE, MoEConfig, experts
from fusedmoe.grouped_matmul import available_backends, backend_names
from fusedmoe.grouped_matmul.api import count_grouped_matmuls
from fusedmoe.reference import activation, moe_forward, route_token

SMALL = dict(num_experts=4, num_experts_per_tok=2, emb_dim=8, mlp_dim=16)
BACKENDS = [name for name in backend_names() if name != "auto"]  # every registered backend


def _backend_or_skip(name):
    reason = available_backends()[name]
    if reason is not None:
        pytest.skip(reason)
    return name


def _pair(config: MoEConfig, seed: int = 0, randomize_biases: bool = True):
    """Unfused and fused layers holding identical weights."""
    unfused = MoE(config.replace(fused_moe_mlp=False), rngs=nnx.Rngs(seed))
    fused = MoE(config.replace(fused_moe_mlp=True), rngs=nnx.Rngs(seed))
    if randomize_biases:
        _randomize_biases(unfused, seed)
        _randomize_biases(fused, seed)
    return unfused, fused


def _randomize_biases(layer: MoE, seed: int):
    """Biases start at zero; give them values so the tests see them."""
    key = jax.random.key(seed + 100)
    for gate_name, up_name, fused_name in (("wi_0_bias", "wi_1_bias", "wi_bias"),):
        if hasattr(layer, fused_name):
            v = jax.random.normal(key, getattr(layer, fused_name)[...].shape) * 0.1
            getattr(layer, fused_name)[...] = v
        elif hasattr(layer, gate_name):
            shape = getattr(layer, gate_name)[...].shape
            v = jax.random.normal(key, (shape[0], 2, shape[1])) * 0.1
            getattr(layer, gate_name)[...] = v[:, 0]
            getattr(layer, up_name)[...] = v[:, 1]
    for name in ("wo_bias", "selection_bias"):
        if hasattr(layer, name):
            v = getattr(layer, name)[...]
            getattr(layer, name)[...] = jax.random.normal(jax.random.key(seed + 7), v.shape) * 0.1
    if getattr(layer.gate, "bias", None) is not None:
        layer.gate.bias[...] = jax.random.normal(jax.random.key(seed + 9), layer.gate.bias.shape)


def _x(shape=(2, 6, 8), dtype=jnp.float32, seed=1):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def _reference(layer: MoE, x):
    state = nnx.state(layer).to_pure_dict()
    t = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return moe_forward(t, state, layer.config).reshape(x.shape)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_equals_unfused_forward_f32(backend):
    config = MoEConfig(**SMALL, gmm_backend=_backend_or_skip(backend), mlp_bias=True)
    unfused, fused = _pair(config)
    x = _x()
    out_u, aux_u = unfused(x)
    out_f, aux_f = fused(x)
    np.testing.assert_allclose(out_f, out_u, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_f, _reference(fused, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(aux_f["tokens_per_expert"], aux_u["tokens_per_expert"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_equals_unfused_forward_bf16(backend):
    config = MoEConfig(**SMALL, gmm_backend=_backend_or_skip(backend), dtype="bfloat16",
                       weight_dtype="bfloat16")
    unfused, fused = _pair(config)
    x = _x(dtype=jnp.bfloat16)
    out_u, _ = unfused(x)
    out_f, _ = fused(x)
    assert out_f.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(out_f, np.float32), np.asarray(out_u, np.float32), rtol=2e-2, atol=2e-2
    )
    # And both near the float64 reference on the same (bf16-rounded) weights.
    ref = _reference(fused, x)
    np.testing.assert_allclose(np.asarray(out_f, np.float32), ref, rtol=5e-2, atol=5e-2)


def test_sparse_dropless_equals_dense_dropless():
    config = MoEConfig(**SMALL, mlp_bias=True)
    sparse = MoE(config, rngs=nnx.Rngs(3))
    dense = MoE(config.replace(sparse_matmul=False), rngs=nnx.Rngs(3))
    _randomize_biases(sparse, 3)
    _randomize_biases(dense, 3)
    x = _x()
    np.testing.assert_allclose(dense(x)[0], sparse(x)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense(x)[0], _reference(dense, x), rtol=1e-5, atol=1e-5)


def test_dense_capacity_drops_pairs_past_capacity():
    config = MoEConfig(**SMALL, sparse_matmul=False, capacity_factor=0.5)
    layer = MoE(config, rngs=nnx.Rngs(0))
    x = _x((1, 16, 8))
    out, aux = layer(x)
    dropless = MoE(config.replace(capacity_factor=-1.0), rngs=nnx.Rngs(0))(x)[0]
    # capacity = ceil(16 * 2 / 4 * 0.5) = 4 rows per expert < 8 on average: some drop.
    assert not np.allclose(out, dropless, atol=1e-6)
    counts = np.asarray(aux["tokens_per_expert"])
    assert int(aux["dropped_rows"]) == int(np.maximum(counts - 4, 0).sum()) > 0
    # Reference: keep each expert's first 4 (token, slot) pairs, slot 0 of all tokens first.
    state = nnx.state(layer).to_pure_dict()
    tokens = np.asarray(x, np.float64)[0]
    routes = [route_token(tokens[t] @ np.asarray(state["gate"]["kernel"]), config)
              for t in range(16)]
    used = {e: 0 for e in range(4)}
    expected = np.zeros_like(tokens)
    for slot in range(2):
        for t in range(16):
            e, w = routes[t][0][slot], routes[t][1][slot]
            if used[e] < 4:
                used[e] += 1
                gate = tokens[t] @ np.asarray(state["wi_0"][e], np.float64)
                up = tokens[t] @ np.asarray(state["wi_1"][e], np.float64)
                expected[t] += w * activation(gate, up, config) @ np.asarray(state["wo"][e])
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)


ROUTING_VARIANTS = {
    "softmax": dict(),
    "softmax_norm_topk": dict(norm_topk_prob=True),
    "softmax_after_topk_router_bias": dict(softmax_after_topk=True, router_bias=True,
                                           routed_scaling_factor=1.5),
    "sigmoid_deepseek": dict(
        num_experts=8, num_experts_per_tok=3, score_func="sigmoid", norm_topk_prob=True,
        routed_scaling_factor=2.5, routing_selection_bias=True, n_routing_groups=4,
        topk_routing_group=2,
    ),
    "shared_expert_gated": dict(shared_experts=1, shared_expert_gate=True),
    "shared_experts_2": dict(shared_experts=2, shared_expert_mlp_dim=24),
}


@pytest.mark.parametrize("variant", sorted(ROUTING_VARIANTS))
@pytest.mark.parametrize("fused", [False, True])
def test_routing_variants_against_reference(variant, fused):
    config = MoEConfig(**{**SMALL, **ROUTING_VARIANTS[variant]}, fused_moe_mlp=fused)
    layer = MoE(config, rngs=nnx.Rngs(5))
    _randomize_biases(layer, 5)
    x = _x((2, 5, 8))
    np.testing.assert_allclose(layer(x)[0], _reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "clamped_swiglu"])
def test_activations_against_reference(act):
    config = MoEConfig(**SMALL, mlp_activations=act, swiglu_limit=0.5, mlp_bias=True)
    unfused, fused = _pair(config, seed=2)
    x = _x() * 3  # big enough that the clamp of clamped_swiglu bites
    ref = _reference(fused, x)
    np.testing.assert_allclose(fused(x)[0], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unfused(x)[0], ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- gradients


def _loss(layer, x):
    out, aux = layer(x)
    return jnp.sum(out * jnp.cos(out)) + aux["load_balance_loss"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_gradients_equal_unfused(backend):
    config = MoEConfig(**SMALL, gmm_backend=_backend_or_skip(backend), mlp_bias=True,
                       shared_experts=1)
    unfused, fused = _pair(config)
    x = _x()
    grad_u, dx_u = nnx.grad(_loss, argnums=(0, 1))(unfused, x)
    grad_f, dx_f = nnx.grad(_loss, argnums=(0, 1))(fused, x)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx_f, dx_u, **tol)
    np.testing.assert_allclose(grad_f["wi"][...][:, :, 0], grad_u["wi_0"][...], **tol)
    np.testing.assert_allclose(grad_f["wi"][...][:, :, 1], grad_u["wi_1"][...], **tol)
    np.testing.assert_allclose(grad_f["wi_bias"][...][:, 0], grad_u["wi_0_bias"][...], **tol)
    np.testing.assert_allclose(grad_f["wi_bias"][...][:, 1], grad_u["wi_1_bias"][...], **tol)
    np.testing.assert_allclose(grad_f["shared_wi"][...][:, 0], grad_u["shared_wi_0"][...], **tol)
    for name in ("wo", "wo_bias", "shared_wo"):
        np.testing.assert_allclose(grad_f[name][...], grad_u[name][...], **tol)
    np.testing.assert_allclose(grad_f["gate"]["kernel"][...], grad_u["gate"]["kernel"][...], **tol)
    # The gradients are not trivially zero.
    assert float(jnp.abs(grad_f["wi"][...]).max()) > 1e-3
    assert float(jnp.abs(grad_f["gate"]["kernel"][...]).max()) > 1e-4


@pytest.mark.parametrize("backend", ["tiled", "cpu_kernel"])
def test_fused_gradients_equal_unfused_bf16(backend):
    # bf16 takes another split of [gate | up] (its cotangent one concatenation).
    config = MoEConfig(**SMALL, gmm_backend=_backend_or_skip(backend), dtype="bfloat16",
                       weight_dtype="bfloat16")
    unfused, fused = _pair(config)
    x = _x(dtype=jnp.bfloat16)
    grad_u, dx_u = nnx.grad(_loss, argnums=(0, 1))(unfused, x)
    grad_f, dx_f = nnx.grad(_loss, argnums=(0, 1))(fused, x)
    as32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    tol = dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(as32(dx_f), as32(dx_u), **tol)
    np.testing.assert_allclose(as32(grad_f["wi"][...][:, :, 0]), as32(grad_u["wi_0"][...]), **tol)
    np.testing.assert_allclose(as32(grad_f["wi"][...][:, :, 1]), as32(grad_u["wi_1"][...]), **tol)
    np.testing.assert_allclose(as32(grad_f["wo"][...]), as32(grad_u["wo"][...]), **tol)
    assert float(jnp.abs(as32(grad_f["wi"][...][:, :, 1])).max()) > 1e-3


def test_split_gate_up_cotangent_is_the_slices_cotangent():
    h = jax.random.normal(jax.random.key(5), (6, 8), jnp.bfloat16)
    cts = tuple(jax.random.normal(jax.random.key(i), (6, 4), jnp.bfloat16) for i in (6, 7))
    out, vjp = jax.vjp(experts.split_gate_up, h)
    ref_out, ref_vjp = jax.vjp(lambda h: (h[:, :4], h[:, 4:]), h)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref_out, np.float32))
    np.testing.assert_array_equal(np.asarray(vjp(cts)[0], np.float32),
                                  np.asarray(ref_vjp(cts)[0], np.float32))


def test_gradients_match_dense_path_and_finite_differences():
    config = MoEConfig(**SMALL)
    sparse = MoE(config.replace(fused_moe_mlp=True), rngs=nnx.Rngs(4))
    dense = MoE(config.replace(sparse_matmul=False), rngs=nnx.Rngs(4))
    x = _x()
    g_sparse, dx_sparse = nnx.grad(_loss, argnums=(0, 1))(sparse, x)
    g_dense, dx_dense = nnx.grad(_loss, argnums=(0, 1))(dense, x)
    np.testing.assert_allclose(dx_sparse, dx_dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_sparse["wi"][...][:, :, 1], g_dense["wi_1"][...], atol=1e-5)
    # Directional finite difference on the input (routing fixed: small step).
    direction = jax.random.normal(jax.random.key(9), x.shape)
    eps = 1e-3
    x64 = x.astype(jnp.float32)
    f = lambda xx: _loss(sparse, xx)
    numeric = (f(x64 + eps * direction) - f(x64 - eps * direction)) / (2 * eps)
    analytic = jnp.sum(dx_sparse * direction)
    np.testing.assert_allclose(numeric, analytic, rtol=2e-2)


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("fused, forward, both", [(True, 2, 6), (False, 3, 9)])
def test_grouped_matmul_count(fused, forward, both):
    config = MoEConfig(**SMALL, gmm_backend="ragged_dot", fused_moe_mlp=fused)
    layer = MoE(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = _x()

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)[0].sum()

    assert count_grouped_matmuls(fwd, state, x) == forward
    assert count_grouped_matmuls(jax.grad(fwd, argnums=(0, 1)), state, x) == both


def test_fused_weight_is_not_copied_or_concatenated():
    config = MoEConfig(**SMALL, gmm_backend="ragged_dot", fused_moe_mlp=True)
    layer = MoE(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    g, k, n = 4, 8, 16

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    hlo = jax.jit(fwd).lower(state, _x()).compile().as_text()
    wide = f"f32[{g},{k},{2 * n}]"
    for line in hlo.splitlines():
        if wide in line.split("=")[0] if "=" in line else False:
            op = line.split("=", 1)[1]
            assert "concatenate" not in op and " copy(" not in op, line
    # And the jaxpr has no concatenate at all in the FFN1 path.
    jaxpr = jax.make_jaxpr(fwd)(state, _x())
    assert "concatenate" not in str(jaxpr)


def test_checkpoint_names_are_tagged():
    config = MoEConfig(**SMALL, fused_moe_mlp=True)
    layer = MoE(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    text = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, _x()))
    for name in ("moe_wi", "moe_act", "moe_wo"):
        assert f"name={name}" in text


def test_remat_policy_by_name_gives_same_gradients():
    config = MoEConfig(**SMALL, fused_moe_mlp=True)
    layer = MoE(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = _x()

    def loss(state, x):
        return _loss(nnx.merge(graphdef, state), x)

    policy = jax.checkpoint_policies.save_only_these_names("moe_wi")
    plain = jax.grad(loss)(state, x)
    remat = jax.grad(jax.checkpoint(loss, policy=policy))(state, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), plain, remat)


# --------------------------------------------------------------------------- params


def test_parameter_names_and_shapes():
    config = MoEConfig(**SMALL, fused_moe_mlp=True, mlp_bias=True)
    state = nnx.state(MoE(config, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    shapes = {k: (v.shape if not isinstance(v, dict) else {kk: vv.shape for kk, vv in v.items()})
              for k, v in state.items()}
    assert shapes == {
        "gate": {"kernel": (8, 4)},
        "wi": (4, 8, 2, 16),
        "wo": (4, 16, 8),
        "wi_bias": (4, 2, 16),
        "wo_bias": (4, 8),
    }
    unfused = nnx.state(MoE(config.replace(fused_moe_mlp=False), rngs=nnx.Rngs(0)), nnx.Param)
    assert set(unfused.to_pure_dict()) == {"gate", "wi_0", "wi_1", "wo", "wi_0_bias",
                                           "wi_1_bias", "wo_bias"}


def test_fused_per_shard_view_keeps_gate_and_up_apart():
    # Sharding N in two: each shard's local [G, K, 2, N/2] views as its own [gate | up].
    config = MoEConfig(**SMALL, fused_moe_mlp=True)
    wi = MoE(config, rngs=nnx.Rngs(0)).wi[...]
    g, k, _, n = wi.shape
    for shard in range(2):
        local = wi[..., shard * n // 2:(shard + 1) * n // 2]
        view = local.reshape(g, k, n)
        np.testing.assert_array_equal(view[..., : n // 2], local[:, :, 0])
        np.testing.assert_array_equal(view[..., n // 2:], local[:, :, 1])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "x, error, words",
    [
        (jnp.ones((6, 8)), ValueError, "rank 3"),
        (jnp.ones((2, 3, 7)), ValueError, "emb_dim=8"),
        (jnp.ones((2, 3, 8), jnp.int32), TypeError, "floating"),
    ],
)
def test_bad_input_is_named(x, error, words):
    layer = MoE(MoEConfig(**SMALL), rngs=nnx.Rngs(0))
    with pytest.raises(error, match=words) as info:
        layer(x)
    assert "x:" in str(info.value)


def test_config_must_be_moeconfig():
    with pytest.raises(TypeError, match="config"):
        MoE({"num_experts": 4}, rngs=nnx.Rngs(0))
