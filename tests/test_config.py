"""MoEConfig: defaults, validation at creation, YAML and key=value loading."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fusedmoe import MoEConfig


def test_defaults_are_valid_and_fusion_is_off():
    c = MoEConfig()
    assert c.fused_moe_mlp is False
    assert c.sparse_matmul is True
    assert c.capacity_factor == -1


def test_fused_requires_sparse_matmul_at_creation():
    with pytest.raises(ValueError) as info:
        MoEConfig(fused_moe_mlp=True, sparse_matmul=False)
    message = str(info.value)
    assert "fused_moe_mlp" in message and "sparse_matmul" in message


def test_fused_requires_sparse_matmul_from_yaml(tmp_path):
    path = tmp_path / "moe.yaml"
    path.write_text("fused_moe_mlp: true\nsparse_matmul: false\n")
    with pytest.raises(ValueError, match="sparse_matmul"):
        MoEConfig.from_yaml(path)


def test_fused_requires_sparse_matmul_from_overrides():
    with pytest.raises(ValueError, match="fused_moe_mlp"):
        MoEConfig.from_overrides(["fused_moe_mlp=true", "sparse_matmul=false"])


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "moe.yaml"
    path.write_text("num_experts: 16\nnum_experts_per_tok: 4\nrouted_scaling_factor: 2\n")
    c = MoEConfig.from_yaml(path, ["fused_moe_mlp=true", "gmm_backend=ragged_dot"])
    assert (c.num_experts, c.num_experts_per_tok, c.fused_moe_mlp) == (16, 4, True)
    assert c.routed_scaling_factor == 2.0 and isinstance(c.routed_scaling_factor, float)
    assert c.gmm_backend == "ragged_dot"
    assert MoEConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_experts=0), "num_experts"),
        (dict(n_routing_groups=3), "n_routing_groups"),
        (dict(n_routing_groups=4, topk_routing_group=5), "topk_routing_group"),
        (dict(n_routing_groups=4, topk_routing_group=1, num_experts_per_tok=4),
         "topk_routing_group"),
        (dict(mlp_activations="relu"), "mlp_activations.*silu"),
        (dict(gmm_backend="cuda"), "gmm_backend.*tiled"),
        (dict(score_func="tanh"), "score_func"),
        (dict(dtype="int8"), "dtype"),
        (dict(sparse_matmul=False, capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=1.5), "capacity_factor.*dense path"),
        (dict(softmax_after_topk=True, score_func="sigmoid"), "softmax_after_topk"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(load_balance_loss_weight=-1.0), "load_balance_loss_weight"),
    ],
)
def test_impossible_combinations_fail_with_the_field_named(changes, words):
    with pytest.raises(ValueError, match=words):
        MoEConfig(**changes)


@pytest.mark.parametrize(
    "changes, words",
    [(dict(emb_dim=1.5), "emb_dim"), (dict(fused_moe_mlp="yes"), "fused_moe_mlp"),
     (dict(num_experts=True), "num_experts")],
)
def test_wrong_types_fail(changes, words):
    with pytest.raises(TypeError, match=words):
        MoEConfig(**changes)


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown field.*num_expert") as info:
        MoEConfig.from_dict({"num_expert": 8})
    assert "num_experts" in str(info.value)


def test_override_needs_equals():
    with pytest.raises(ValueError, match="key=value"):
        MoEConfig.from_overrides(["fused_moe_mlp"])


def test_every_field_is_documented():
    import dataclasses
    import pathlib

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [f.name for f in dataclasses.fields(MoEConfig) if f"`{f.name}`" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}"


@pytest.mark.parametrize(
    "value, name",
    [(jnp.bfloat16, "bfloat16"), (np.float32, "float32"), (np.dtype("float16"), "float16"),
     (jnp.dtype("bfloat16"), "bfloat16"), ("bf16", "bfloat16"), ("float32", "float32")],
    ids=["jnp-type", "np-type", "np-dtype", "jnp-dtype", "short-name", "name"],
)
def test_dtypes_as_names_or_objects(value, name):
    # JAX and Flax users pass dtypes as objects: one canonical form, the name.
    c = MoEConfig(dtype=value, weight_dtype=value)
    assert c.dtype == c.weight_dtype == name
    assert c == MoEConfig(dtype=name, weight_dtype=name)
    assert MoEConfig.from_dict(c.to_dict()) == c  # and it round-trips through YAML/JSON


@pytest.mark.parametrize("value, exc", [(jnp.int32, ValueError), ("int8", ValueError),
                                        (3, TypeError), (object(), TypeError)])
def test_bad_dtype_names_the_field(value, exc):
    with pytest.raises(exc, match="weight_dtype"):
        MoEConfig(weight_dtype=value)
