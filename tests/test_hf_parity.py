"""Parity with Hugging Face transformers' MoE blocks, and exact HF round trips.

For each family a tiny random model is built from a transformers config, saved
with ``save_pretrained`` (per-expert tensor names) and as its in-memory
``state_dict`` (transformers v5 packed names); layer ``i``'s block is loaded
with :func:`fusedmoe.hf.load_moe_layer` (fused and unfused) and run beside the
transformers block on the same input.
"""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from fusedmoe import hf

pytestmark = pytest.mark.hf
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# model_type -> (config overrides, the MoE layer to test)
FAMILIES = {
    "mixtral": (dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2), 0),
    "qwen2_moe": (dict(intermediate_size=48, moe_intermediate_size=16, norm_topk_prob=False,
                       shared_expert_intermediate_size=24, num_experts=6,
                       num_experts_per_tok=2), 0),
    "qwen3_moe": (dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                       num_experts_per_tok=3, norm_topk_prob=True, head_dim=8), 0),
    "olmoe": (dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                   pad_token_id=1, eos_token_id=2), 0),
    "deepseek_v3": (dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                         n_shared_experts=2, num_experts_per_tok=2, n_group=4, topk_group=2,
                         routed_scaling_factor=2.5, first_k_dense_replace=1, kv_lora_rank=8,
                         q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                         v_head_dim=8), 1),
    "gpt_oss": (dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                     head_dim=8, sliding_window=8, swiglu_limit=1.0), 0),
}
RESULTS: dict[str, float] = {}


def _layer_tensors(path, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="np") as sf:
            for name in sf.keys():  # noqa: SIM118
                if name.startswith(prefix):
                    out[name] = sf.get_tensor(name)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(model_type, transformers model, save_pretrained dir, packed dir, MoE layer)."""
    model_type = request.param
    overrides, layer = FAMILIES[model_type]
    config = transformers.AutoConfig.for_model(model_type, **COMMON, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "router" in name or ".gate." in name else 0.2)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:  # moves the selection, not the weights
                b.uniform_(-0.05, 0.05)
    base = tmp_path_factory.mktemp(model_type)
    per_expert = base / "per_expert"
    model.save_pretrained(per_expert)
    # The in-memory (transformers v5, packed) names, as a checkpoint of their own.
    from safetensors.torch import save_file

    packed = base / "packed"
    packed.mkdir()
    shutil.copy(per_expert / "config.json", packed / "config.json")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(packed / "model.safetensors"), metadata={"format": "pt"})
    return model_type, model, per_expert, packed, layer


def _hf_block(model, layer):
    return model.model.layers[layer].mlp


def _run_hf(block, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = block(torch.from_numpy(x))
    if isinstance(out, tuple):  # gpt-oss returns (hidden, router_scores)
        out = out[0]
    return out.numpy()


def _state(moe):
    from fusedmoe.checkpoint.module_checkpoint import module_state

    return module_state(moe)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_same_state(value, b[key])
        else:
            assert value.dtype == b[key].dtype, key
            np.testing.assert_array_equal(value, b[key], err_msg=key)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_forward_parity(family, fused):
    model_type, model, per_expert, packed, layer = family
    moe = hf.load_moe_layer(per_expert, layer, fused_moe_mlp=fused)
    assert moe.config.fused_moe_mlp is fused
    # The packed (v5) checkpoint loads to the very same numbers.
    _assert_same_state(_state(moe), _state(hf.load_moe_layer(packed, layer, fused_moe_mlp=fused)))
    x = np.random.default_rng(1).normal(size=(2, 7, COMMON["hidden_size"])).astype(np.float32)
    want = _run_hf(_hf_block(model, layer), x)
    got = np.asarray(moe(jnp.asarray(x))[0])
    diff = float(np.abs(got - want).max())
    RESULTS[f"{model_type}/{'fused' if fused else 'unfused'}"] = diff
    print(f"{model_type} fused={fused}: max abs diff {diff:.2e}")
    assert diff < TOL, f"{model_type}: max abs diff {diff} vs transformers"
    assert np.abs(want).max() > 1e-2  # the test is not comparing zeros


def test_round_trip_per_expert(family):
    """HF (save_pretrained) -> fusedmoe (fused) -> HF reproduces every tensor exactly."""
    model_type, _, per_expert, _, layer = family
    moe = hf.load_moe_layer(per_expert, layer, fused_moe_mlp=True)
    exported = hf.export_moe_layer(moe, model_type, layer=layer)
    block = hf.FAMILIES[model_type].export_block
    original = _layer_tensors(per_expert, f"model.layers.{layer}.{block}.")
    assert sorted(exported) == sorted(original)
    for name, want in original.items():
        assert exported[name].dtype == want.dtype, name
        np.testing.assert_array_equal(exported[name], want, err_msg=name)


def test_round_trip_packed(family):
    model_type, _, _, packed, layer = family
    moe = hf.load_moe_layer(packed, layer, fused_moe_mlp=False)
    exported = hf.export_moe_layer(moe, model_type, layer=layer, packed=True)
    original = _layer_tensors(packed, f"model.layers.{layer}.mlp.")
    assert sorted(exported) == sorted(original)
    for name, want in original.items():
        np.testing.assert_array_equal(exported[name], want, err_msg=name)


def test_export_written_and_reloaded(family, tmp_path):
    """export -> save_safetensors -> load_moe_layer gives the same layer back."""
    model_type, _, per_expert, _, layer = family
    moe = hf.load_moe_layer(per_expert, layer)
    config = json.loads((per_expert / "config.json").read_text())
    out = hf.save_safetensors(tmp_path / "out", hf.export_moe_layer(moe, model_type, layer=layer),
                              hf_config=config)
    again = hf.load_moe_layer(out, layer)
    assert again.config == moe.config
    _assert_same_state(_state(moe), _state(again))


def test_config_matches_transformers(family):
    model_type, model, per_expert, _, layer = family
    moe = hf.load_moe_layer(per_expert, layer)
    c, tc = moe.config, model.config
    assert c.emb_dim == tc.hidden_size
    assert c.num_experts_per_tok == tc.num_experts_per_tok
    assert layer in hf.moe_layer_indices(json.loads((per_expert / "config.json").read_text()))


def test_deepseek_dense_layer_is_refused(tmp_path_factory):
    overrides, _ = FAMILIES["deepseek_v3"]
    config = transformers.AutoConfig.for_model("deepseek_v3", **COMMON, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("ds_dense")
    model.save_pretrained(path)
    with pytest.raises(hf.CheckpointError, match="layer 0 is a dense MLP layer"):
        hf.load_moe_layer(path, 0)
    with pytest.raises(hf.CheckpointError, match="past the model"):
        hf.load_moe_layer(path, 2)
    assert list(hf.load_moe_layers(path)) == [1]


@pytest.mark.parametrize("family", ["deepseek_v3"], indirect=True)
def test_deepseek_bias_and_groups_are_exercised(family):
    """The parity above would not notice a dropped selection bias or group limit
    unless they change the routing of this input: check that they do."""
    _, _, per_expert, _, layer = family
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, COMMON["hidden_size"])),
                    jnp.float32)
    base = np.asarray(hf.load_moe_layer(per_expert, layer)(x)[0])
    no_bias = hf.load_moe_layer(per_expert, layer)
    no_bias.selection_bias[...] = jnp.zeros_like(no_bias.selection_bias[...])
    ungrouped = hf.load_moe_layer(per_expert, layer, n_routing_groups=1, topk_routing_group=1)
    assert np.abs(np.asarray(no_bias(x)[0]) - base).max() > 1e-4
    assert np.abs(np.asarray(ungrouped(x)[0]) - base).max() > 1e-4


# Fields of hf_config_for that place layers or note provenance, not the block itself.
_PLACEMENT = {"fusedmoe_note", "num_hidden_layers", "mlp_only_layers", "decoder_sparse_step",
              "first_k_dense_replace", "dtype"}


def test_written_config_uses_transformers_names_and_values(family):
    """The config.json written for a native layer names each MoE field as transformers'
    config class does, with the value of the model the layer came from."""
    model_type, model, per_expert, _, layer = family
    moe = hf.load_moe_layer(per_expert, layer)
    written = hf.hf_config_for(moe.config, model_type, [layer])
    tc = model.config
    missing = [k for k in written if k not in _PLACEMENT and not hasattr(tc, k)]
    # DeepSeek-V3's released config.json has these two; transformers' class does not declare them.
    assert missing == (["scoring_func", "topk_method"] if model_type == "deepseek_v3" else [])
    for key, value in written.items():
        if key not in _PLACEMENT and hasattr(tc, key):
            assert getattr(tc, key) == value, key
    assert layer in hf.moe_layer_indices(written)
