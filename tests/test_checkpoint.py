"""Checkpoints: layout converters, orbax save/restore, fused <-> unfused conversion,
HF import/export without torch, the ``convert`` command, atomicity and bad input."""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import fusedmoe
from fusedmoe import cli, hf
from fusedmoe.checkpoint import fuse_state, layouts
from fusedmoe.checkpoint.layouts import Layout
from fusedmoe.checkpoint.module_checkpoint import (
    META_FILE,
    convert_module_checkpoint,
    load_module_checkpoint,
    module_state,
    moe_from_module_checkpoint,
    read_module_checkpoint_meta,
    restore_module_checkpoint,
    save_module_checkpoint,
)

G, K, N = 3, 4, 5


def _unfused(dtype=np.float32, bias=False, seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.normal(size=s).astype(dtype)  # noqa: E731
    t = {"wi_0": r(G, K, N), "wi_1": r(G, K, N), "wo": r(G, N, K)}
    if bias:
        t.update(wi_0_bias=r(G, N), wi_1_bias=r(G, N), wo_bias=r(G, K))
    return t


def _assert_equal_dicts(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        if isinstance(a[key], dict):
            _assert_equal_dicts(a[key], b[key])
            continue
        assert np.asarray(a[key]).dtype == np.asarray(b[key]).dtype, key
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_layout_round_trip_is_bit_exact(layout, bias, dtype):
    t = _unfused(dtype, bias)
    written = layouts.from_unfused(t, layout)
    kw = {"num_experts": G} if layout == "hf_per_expert" else {}
    back = layouts.to_unfused(written, layout, **kw)
    assert sorted(back) == sorted(t)
    for key in t:
        assert _bits_equal(back[key], t[key]), key


def test_every_pair_of_layouts_converts_exactly():
    t = _unfused(bias=True)
    names = layouts.MIXTRAL_NAMES
    for src, dst in itertools.product(layouts.LAYOUTS, repeat=2):
        a = layouts.from_unfused(t, src, **({"names": names} if src == "hf_per_expert" else {}))
        b = layouts.convert(a, src, dst, num_experts=G, names=names)
        back = layouts.convert(b, dst, "fusedmoe_unfused", num_experts=G, names=names)
        for key in t:
            assert _bits_equal(back[key], t[key]), (src, dst, key)


def test_layouts_put_gate_and_up_where_each_system_expects():
    t = _unfused(bias=True)
    g0, u0, wo = t["wi_0"], t["wi_1"], t["wo"]
    fused = layouts.from_unfused(t, Layout.FUSEDMOE_FUSED)
    np.testing.assert_array_equal(fused["wi"][:, :, 0], g0)
    np.testing.assert_array_equal(fused["wi"][:, :, 1], u0)
    _assert_equal_dicts(fused, fuse_state(t))  # the same layout as checkpoint.fusion
    per = layouts.from_unfused(t, Layout.HF_PER_EXPERT, names=layouts.MIXTRAL_NAMES)
    np.testing.assert_array_equal(per["1.w1.weight"], g0[1].T)  # torch Linear [out, in]
    np.testing.assert_array_equal(per["1.w3.weight"], u0[1].T)
    np.testing.assert_array_equal(per["1.w2.weight"], wo[1].T)
    packed = layouts.from_unfused(t, Layout.HF_PACKED)
    assert packed["gate_up_proj"].shape == (G, 2 * N, K)
    np.testing.assert_array_equal(packed["gate_up_proj"][:, :N], g0.transpose(0, 2, 1))
    np.testing.assert_array_equal(packed["down_proj"], wo.transpose(0, 2, 1))
    oss = layouts.from_unfused(t, Layout.GPT_OSS)
    assert oss["gate_up_proj"].shape == (G, K, 2 * N)
    np.testing.assert_array_equal(oss["gate_up_proj"][..., ::2], g0)
    np.testing.assert_array_equal(oss["gate_up_proj"][..., 1::2], u0)
    np.testing.assert_array_equal(oss["gate_up_proj_bias"][..., 1::2], t["wi_1_bias"])
    np.testing.assert_array_equal(oss["down_proj"], wo)
    pre = layouts.from_unfused(t, Layout.MAXTEXT_PREFUSED)
    np.testing.assert_array_equal(pre["wi"][..., :N], g0)
    np.testing.assert_array_equal(pre["wi"][..., N:], u0)
    np.testing.assert_array_equal(pre["wi"], fused["wi"].reshape(G, K, 2 * N))
    assert sorted(layouts.from_unfused(t, "maxtext_unfused")) == sorted(t)


def test_layout_errors_name_layout_and_tensor():
    t = _unfused()
    with pytest.raises(ValueError, match="unknown layout 'mixtral'.*fusedmoe_fused"):
        layouts.convert(t, "mixtral", "fusedmoe_fused")
    with pytest.raises(KeyError, match="fusedmoe_unfused: missing tensor 'wi_1'"):
        layouts.to_unfused({"wi_0": t["wi_0"], "wo": t["wo"]}, "fusedmoe_unfused")
    bad = dict(t, wo=t["wo"][:, :-1])
    with pytest.raises(ValueError, match=r"'wo' has shape \(3, 4, 4\), expected \(3, 5, 4\)"):
        layouts.from_unfused(bad, "gpt_oss")
    with pytest.raises(ValueError, match="odd 2N"):
        layouts.to_unfused({"gate_up_proj": np.zeros((G, K, 7)), "down_proj": t["wo"]}, "gpt_oss")
    per = layouts.from_unfused(t, "hf_per_expert")
    del per["2.up_proj.weight"]
    with pytest.raises(KeyError, match="hf_per_expert: missing tensor '2.up_proj.weight'"):
        layouts.to_unfused(per, "hf_per_expert", num_experts=G)
    with pytest.raises(TypeError, match="num_experts"):
        layouts.convert(per, "hf_per_expert", "hf_packed")
    with pytest.raises(KeyError, match="biases must come together"):
        layouts.from_unfused(dict(t, wo_bias=np.zeros((G, K), np.float32)), "hf_packed")


# ----------------------------------------------------------------------------- orbax
FULL = fusedmoe.MoEConfig(
    num_experts=4, num_experts_per_tok=2, emb_dim=8, mlp_dim=6, mlp_bias=True, router_bias=True,
    routing_selection_bias=True, shared_experts=1, shared_expert_gate=True,
)


def _randomize(moe, seed=3):
    """Non-zero biases everywhere, so a dropped tensor would show."""
    state = nnx.state(moe)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) * 0.3
           for k, x in zip(keys, leaves)]
    nnx.update(moe, jax.tree.unflatten(treedef, new))
    return moe


@pytest.fixture(scope="module")
def moe():
    return _randomize(fusedmoe.MoE(FULL, rngs=nnx.Rngs(0)))


def test_orbax_save_restore_is_exact(moe, tmp_path):
    path = save_module_checkpoint(tmp_path / "ckpt", moe)
    meta = read_module_checkpoint_meta(path)
    assert meta["layout"] == "fusedmoe_unfused" and meta["configs"][""]["mlp_bias"]
    again = moe_from_module_checkpoint(path)
    assert again.config == moe.config
    _assert_equal_dicts(module_state(again), module_state(moe))
    other = fusedmoe.MoE(FULL, rngs=nnx.Rngs(9))
    restore_module_checkpoint(path, other)
    _assert_equal_dicts(module_state(other), module_state(moe))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_orbax_bf16_and_nested_modules(tmp_path):
    cfg = FULL.replace(weight_dtype="bfloat16", fused_moe_mlp=True)

    class Two(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([fusedmoe.MoE(cfg, rngs=nnx.Rngs(i)) for i in range(2)])

    model = Two()
    path = save_module_checkpoint(tmp_path / "two", model)
    tree, meta = load_module_checkpoint(path)
    assert sorted(meta["configs"]) == ["layers/0", "layers/1"]
    assert tree["layers"]["1"]["wi"].dtype == ml_dtypes.bfloat16
    _assert_equal_dicts(tree, module_state(model))
    layer1 = moe_from_module_checkpoint(path, "layers/1")
    _assert_equal_dicts(module_state(layer1), module_state(model.layers[1]))
    with pytest.raises(ValueError, match="holds 2 MoE layers"):
        moe_from_module_checkpoint(path)


def test_convert_module_checkpoint_fused_unfused_exact(moe, tmp_path):
    src = save_module_checkpoint(tmp_path / "unfused", moe)
    fused = convert_module_checkpoint(src, tmp_path / "fused", fused=True)
    tree, meta = load_module_checkpoint(fused)
    assert meta["layout"] == "fusedmoe_fused" and meta["configs"][""]["fused_moe_mlp"]
    assert tree["wi"].shape == (4, 8, 2, 6) and "wi_0" not in tree
    np.testing.assert_array_equal(tree["wi"][:, :, 1], np.asarray(moe.wi_1[...]))
    back = convert_module_checkpoint(fused, tmp_path / "back", fused=False)
    _assert_equal_dicts(load_module_checkpoint(back)[0], module_state(moe))
    m_fused = moe_from_module_checkpoint(fused)
    assert m_fused.config.fused_moe_mlp
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    np.testing.assert_allclose(np.asarray(m_fused(x)[0]), np.asarray(moe(x)[0]), atol=1e-6)


def test_save_creates_missing_parents_and_removes_them_on_failure(moe, tmp_path, monkeypatch):
    path = save_module_checkpoint(tmp_path / "runs" / "a" / "step_1", moe)
    assert (path / META_FILE).is_file()
    import orbax.checkpoint as ocp

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_module_checkpoint(tmp_path / "runs" / "b" / "c" / "step_1", moe)
    monkeypatch.undo()
    # The directories the failed save made are gone; the ones it found stay.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        save_module_checkpoint(tmp_path / "file" / "ckpt", moe)


def test_orbax_writes_are_atomic(moe, tmp_path, monkeypatch):
    path = save_module_checkpoint(tmp_path / "ckpt", moe)
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(FileExistsError, match="already exists"):
        save_module_checkpoint(path, moe)
    assert sorted(p.name for p in path.rglob("*")) == before
    # A failure in the middle of a write leaves neither the target nor a temp dir.
    import orbax.checkpoint as ocp

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_module_checkpoint(tmp_path / "new", moe)
    with pytest.raises(OSError, match="disk full"):
        save_module_checkpoint(path, moe, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in path.rglob("*")) == before
    # A conversion that cannot be done writes nothing.
    dense = save_module_checkpoint(tmp_path / "dense",
                                   fusedmoe.MoE(FULL.replace(sparse_matmul=False),
                                                rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="fused_moe_mlp=True requires sparse_matmul"):
        convert_module_checkpoint(dense, tmp_path / "dense_fused", fused=True)
    assert not (tmp_path / "dense_fused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "dense"]


def test_orbax_bad_input(moe, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_module_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a fusedmoe checkpoint"):
        load_module_checkpoint(tmp_path / "empty")
    path = save_module_checkpoint(tmp_path / "ckpt", moe)
    smaller = fusedmoe.MoE(FULL.replace(mlp_dim=4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"state \w*wi_0: shape \(\d.*6\) does not match"):
        restore_module_checkpoint(path, smaller)
    with pytest.raises(ValueError, match="keys do not match"):
        restore_module_checkpoint(path, fusedmoe.MoE(FULL.replace(mlp_bias=False),
                                                     rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------- HF without torch
HF_CONFIGS = {
    "mixtral": dict(num_local_experts=4, intermediate_size=6),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=6, shared_expert_intermediate_size=5,
                      norm_topk_prob=False),
    "qwen3_moe": dict(num_local_experts=4, moe_intermediate_size=6, norm_topk_prob=True,
                      mlp_only_layers=[1]),
    "olmoe": dict(num_experts=4, intermediate_size=6),
    "deepseek_v3": dict(n_routed_experts=4, moe_intermediate_size=6, n_shared_experts=1,
                        n_group=2, topk_group=1, routed_scaling_factor=2.5,
                        first_k_dense_replace=1, norm_topk_prob=True),
    "gpt_oss": dict(num_local_experts=4, intermediate_size=6, swiglu_limit=7.0),
}


def _hf_config(model_type, **extra):
    return dict(model_type=model_type, hidden_size=8, num_hidden_layers=3, num_experts_per_tok=2,
                hidden_act="silu", dtype="float32", **HF_CONFIGS[model_type], **extra)


def _write_hf(tmp_path, model_type, name="hf", packed=False, mutate=None):
    """A synthetic HF directory whose MoE layers come from random fusedmoe layers."""
    cfg = _hf_config(model_type)
    tensors = {}
    for i in hf.moe_layer_indices(cfg):
        m = _randomize(fusedmoe.MoE(hf.moe_config(cfg, fused_moe_mlp=False), rngs=nnx.Rngs(i)),
                       seed=i)
        tensors.update(hf.export_moe_layer(m, model_type, layer=i, packed=packed))
    tensors["model.embed_tokens.weight"] = np.zeros((16, 8), np.float32)
    if mutate:
        mutate(cfg, tensors)
    return hf.save_safetensors(tmp_path / name, tensors, hf_config=cfg), tensors


@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_hf_export_import_round_trip_without_torch(model_type, tmp_path):
    path, tensors = _write_hf(tmp_path, model_type)
    layers = hf.load_moe_layers(path, fused_moe_mlp=True)
    assert list(layers) == hf.moe_layer_indices(_hf_config(model_type))
    for i, m in layers.items():
        assert m.config.fused_moe_mlp
        out = hf.export_moe_layer(m, model_type, layer=i)
        for name, a in out.items():
            assert _bits_equal(a, tensors[name]), name


def test_hf_config_mapping():
    c = hf.moe_config(_hf_config("deepseek_v3"), fused_moe_mlp=False)
    assert (c.score_func, c.routing_selection_bias, c.n_routing_groups, c.topk_routing_group,
            c.routed_scaling_factor, c.shared_mlp_dim, c.norm_topk_prob) == (
        "sigmoid", True, 2, 1, 2.5, 6, True)
    c = hf.moe_config(_hf_config("gpt_oss"))
    assert (c.softmax_after_topk, c.router_bias, c.mlp_bias, c.mlp_activations) == (
        True, True, True, "clamped_swiglu")
    c = hf.moe_config(_hf_config("qwen2_moe"), gmm_backend="ragged_dot")
    assert (c.shared_mlp_dim, c.shared_expert_gate, c.gmm_backend) == (5, True, "ragged_dot")
    assert hf.moe_config(_hf_config("mixtral")).norm_topk_prob
    assert hf.moe_layer_indices(_hf_config("qwen3_moe")) == [0, 2]
    stepped = dict(_hf_config("qwen3_moe"), decoder_sparse_step=2, mlp_only_layers=[])
    assert hf.moe_layer_indices(stepped) == [1]


@pytest.mark.parametrize("model_type", list(HF_CONFIGS))
def test_hf_config_for_is_read_back_as_the_same_layer(model_type):
    source = _hf_config(model_type)
    cfg = hf.moe_config(source)
    layers = hf.moe_layer_indices(source)
    written = hf.hf_config_for(cfg, model_type, layers)
    assert hf.moe_config(written) == cfg
    assert hf.moe_layer_indices(written) == layers
    assert hf.moe_layer_indices(hf.hf_config_for(cfg, model_type, [2])) [-1] == 2
    with pytest.raises(ValueError, match=r"layers: expected decoder layer indices >= 0, got \[\]"):
        hf.hf_config_for(cfg, model_type, [])


def test_hf_bad_input(tmp_path):
    path, _ = _write_hf(tmp_path, "qwen3_moe")
    with pytest.raises(hf.CheckpointError, match="layer 3 is past the model: num_hidden_layers=3"):
        hf.load_moe_layer(path, 3)
    with pytest.raises(hf.CheckpointError, match="layer 1 is a dense MLP layer.*MoE layers: 0, 2"):
        hf.load_moe_layer(path, 1)
    (tmp_path / "plain").mkdir()
    with pytest.raises(hf.CheckpointError, match="not a Hugging Face model directory"):
        hf.load_moe_layer(tmp_path / "plain", 0)
    with pytest.raises(hf.CheckpointError, match="not a directory"):
        hf.load_moe_layer(tmp_path / "missing", 0)
    (tmp_path / "plain" / "config.json").write_text(json.dumps(_hf_config("qwen3_moe")))
    (tmp_path / "plain" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(hf.CheckpointError, match="no \\*.safetensors files.*not read"):
        hf.load_moe_layer(tmp_path / "plain", 0)

    bad, _ = _write_hf(tmp_path, "qwen3_moe", "unknown")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.CheckpointError,
                       match="unsupported model_type 'llama'; supported: mixtral, qwen2_moe"):
        hf.load_moe_layer(bad, 0)

    def drop(cfg, tensors):
        del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]

    missing, _ = _write_hf(tmp_path, "qwen3_moe", "missing_tensor", mutate=drop)
    hf.load_moe_layer(missing, 0)  # layer 0 is complete
    with pytest.raises(hf.CheckpointError,
                       match="missing tensor 'model.layers.2.mlp.experts.3.up_proj.weight'"):
        hf.load_moe_layer(missing, 2)
    with pytest.raises(hf.CheckpointError, match="missing tensor"):
        hf.load_moe_layers(missing)  # all layers are checked before any is built

    def reshape(cfg, tensors):
        cfg["moe_intermediate_size"] = 7

    shape, _ = _write_hf(tmp_path, "qwen3_moe", "bad_shape", mutate=reshape)
    with pytest.raises(hf.CheckpointError, match=(
            r"model.safetensors: tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' has "
            r"shape \[6, 8\], but config.json implies \[7, 8\] \(num_experts=\d+, "
            r"hidden_size=8, expert mlp dim=7\)")):
        hf.load_moe_layer(shape, 0)

    def quantize(cfg, tensors):
        tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = np.zeros(4, np.uint8)

    quant, _ = _write_hf(tmp_path, "qwen3_moe", "quant", mutate=quantize)
    with pytest.raises(hf.CheckpointError, match="is quantized"):
        hf.load_moe_layer(quant, 0)


# ----------------------------------------------------------------------------- CLI
def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_cli_hf_orbax_hf_round_trip(tmp_path, capsys):
    src, tensors = _write_hf(tmp_path, "deepseek_v3")
    assert cli.main(["convert", str(src), str(tmp_path / "ck"), "--unfused", "--moe-layers"]) == 0
    tree, meta = load_module_checkpoint(tmp_path / "ck")
    assert meta["layout"] == "fusedmoe_unfused" and meta["metadata"]["layers"] == [1, 2]
    assert sorted(tree["layers"]) == ["1", "2"]
    assert cli.main(["convert", str(tmp_path / "ck"), str(tmp_path / "ck_fused"), "--fused"]) == 0
    m = moe_from_module_checkpoint(tmp_path / "ck_fused", "layers/2")
    assert m.config.fused_moe_mlp and m.config.score_func == "sigmoid"
    # dst's missing parent directory is created.
    assert cli.main(["convert", str(tmp_path / "ck_fused"), str(tmp_path / "hf" / "back")]) == 0
    back = hf.SafetensorsDir(tmp_path / "hf" / "back")
    moe_names = [n for n in tensors if ".mlp." in n]
    assert back.names() == sorted(moe_names)
    for name in moe_names:
        assert _bits_equal(back.get(name), tensors[name]), name
    # one layer, and the packed v5 names
    assert cli.main(["convert", str(src), str(tmp_path / "one"), "--layer", "2"]) == 0
    assert cli.main(["convert", str(tmp_path / "one"), str(tmp_path / "one_hf"), "--packed"]) == 0
    assert "model.layers.2.mlp.experts.gate_up_proj" in hf.SafetensorsDir(tmp_path / "one_hf")
    again = hf.load_moe_layer(tmp_path / "one_hf", 2)
    _assert_equal_dicts(module_state(again), module_state(m))
    assert "wrote" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    src, _ = _write_hf(tmp_path, "qwen3_moe")
    (tmp_path / "afile").write_text("x")
    before = _listing(tmp_path)
    cases = [
        ([str(tmp_path / "nope"), str(tmp_path / "x")], "does not exist"),
        ([str(src), str(tmp_path / "afile" / "x")], "is a file, not a directory"),
        # Refused before any write: dst's missing parent is not made either.
        ([str(src), str(tmp_path / "new" / "x"), "--layer", "9"], "past the model"),
        ([str(src), str(tmp_path / "x"), "--layer", "1"], "dense MLP layer"),
        ([str(src), str(tmp_path / "x"), "--layer", "9"], "past the model"),
        ([str(src), str(tmp_path / "x"), "--packed"], "--packed"),
        ([str(src), str(src)], "must differ"),
        ([str(src), str(tmp_path)], "already exists"),
        ([str(tmp_path), str(tmp_path / "x")], "neither a Hugging Face model"),
    ]
    for argv, message in cases:
        assert cli.main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
        assert err.startswith("fusedmoe convert: error:")
        assert _listing(tmp_path) == before, argv

    def drop(cfg, tensors):
        del tensors["model.layers.2.mlp.gate.weight"]

    broken, _ = _write_hf(tmp_path, "qwen3_moe", "broken", mutate=drop)
    before = _listing(tmp_path)
    assert cli.main(["convert", str(broken), str(tmp_path / "out"), "--moe-layers"]) == 2
    err = capsys.readouterr().err
    assert "missing tensor 'model.layers.2.mlp.gate.weight'" in err
    assert _listing(tmp_path) == before  # layer 0 was fine, but nothing was written


def test_cli_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    src, _ = _write_hf(tmp_path, "olmoe")
    before = _listing(tmp_path)
    import orbax.checkpoint as ocp

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["convert", str(src), str(tmp_path / "out"), "--moe-layers"])
    assert _listing(tmp_path) == before
    model = _write_hf_model(tmp_path / "models", "olmoe")
    before = _listing(tmp_path / "models")
    with pytest.raises(OSError, match="disk full"):
        cli.main(["convert", str(model), str(tmp_path / "models" / "out")])  # whole model
    assert _listing(tmp_path / "models") == before
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))


def test_export_refuses_semantics_the_family_lacks(tmp_path, capsys):
    sigmoid = fusedmoe.MoE(fusedmoe.MoEConfig(num_experts=4, emb_dim=8, mlp_dim=4,
                                              score_func="sigmoid"), rngs=nnx.Rngs(0))
    with pytest.raises(hf.CheckpointError, match="cannot be exported as qwen3_moe.*score_func"):
        hf.export_moe_layer(sigmoid, "qwen3_moe")
    with pytest.raises(hf.CheckpointError, match="unsupported model_type 'llama'"):
        hf.export_moe_layer(sigmoid, "llama")
    plain = fusedmoe.MoE(sigmoid.config.replace(score_func="softmax"), rngs=nnx.Rngs(0))
    assert "model.layers.0.mlp.gate.weight" in hf.export_moe_layer(plain, "qwen3_moe")
    save_module_checkpoint(tmp_path / "native", plain)
    argv = ["convert", str(tmp_path / "native"), str(tmp_path / "hf")]
    assert cli.main(argv) == 2 and "records no model_type" in capsys.readouterr().err
    assert cli.main([*argv, "--model-type", "mixtral"]) == 2
    assert "norm_topk_prob=False (needs True)" in capsys.readouterr().err
    assert cli.main([*argv, "--model-type", "olmoe"]) == 0
    assert hf.SafetensorsDir(tmp_path / "hf").names("model.layers.0.mlp.experts.3.")
    assert "writing one that describes its MoE layers only" in capsys.readouterr().out
    assert _listing(tmp_path) == ["hf", "native"]
    # The config.json written for the native layer reads back as that layer.
    back = hf.load_moe_layer(tmp_path / "hf", 0, fused_moe_mlp=plain.config.fused_moe_mlp)
    assert back.config == plain.config.replace(dtype=back.config.dtype)
    want = hf.export_moe_layer(plain, "olmoe")
    for name, a in hf.export_moe_layer(back, "olmoe").items():
        assert _bits_equal(a, want[name]), name


# ----------------------------------------------------------------------------- whole models
WHOLE_CONFIGS = {  # dense and MoE layers, shared experts and q/k/v biases; tied, clipped
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=6, shared_expert_intermediate_size=5,
                      intermediate_size=12, mlp_only_layers=[1], norm_topk_prob=False),
    "olmoe": dict(num_experts=4, intermediate_size=6, tie_word_embeddings=True, clip_qkv=0.5),
}


def _write_hf_model(root, model_type, dtype="float32"):
    """A whole random model of ``model_type`` in ``dtype``, saved as transformers would."""
    from fusedmoe.model import Decoder

    cfg = dict(model_type=model_type, vocab_size=16, hidden_size=8, num_hidden_layers=3,
               num_attention_heads=2, num_key_value_heads=1, num_experts_per_tok=2,
               max_position_embeddings=32, rms_norm_eps=1e-6, hidden_act="silu",
               **WHOLE_CONFIGS[model_type])
    model = _randomize(Decoder(hf.model_config(cfg, dtype=dtype), rngs=nnx.Rngs(0)))
    return hf.save_model(model, root / f"{model_type}-{dtype}")


@pytest.mark.parametrize(("model_type", "dtype"), [("qwen2_moe", "float32"),
                                                   ("olmoe", "bfloat16")])
def test_cli_whole_model_round_trips_bit_exact(model_type, dtype, tmp_path):
    from fusedmoe.checkpoint.module_checkpoint import model_from_module_checkpoint

    src = _write_hf_model(tmp_path, model_type, dtype)
    source = hf.SafetensorsDir(src)
    convert = lambda *argv: cli.main(["convert", *map(str, argv)])  # noqa: E731
    assert convert(src, tmp_path / "ck") == 0  # the whole model, fused by default
    tree, meta = load_module_checkpoint(tmp_path / "ck")
    assert meta["layout"] == "fusedmoe_fused"
    assert meta["metadata"]["model_config"]["model_type"] == model_type
    assert sorted(meta["configs"]) == [f"blocks/{i}/ffn" for i in hf.moe_layer_indices(
        meta["metadata"]["hf_config"])]
    assert {"embed", "blocks", "final_norm"} <= set(tree)
    assert convert(tmp_path / "ck", tmp_path / "ck_unfused", "--unfused") == 0
    assert load_module_checkpoint(tmp_path / "ck_unfused")[1]["metadata"]["model_config"][
        "moe"]["fused_moe_mlp"] is False
    # HF -> orbax (fused) -> orbax (unfused) -> HF: every tensor bit for bit
    assert convert(tmp_path / "ck_unfused", tmp_path / "back") == 0
    back = hf.SafetensorsDir(tmp_path / "back")
    assert back.names() == source.names()
    for name in source.names():
        assert _bits_equal(back.get(name), source.get(name)), name
    # orbax -> HF -> orbax: the state bit for bit
    assert convert(tmp_path / "back", tmp_path / "ck_again", "--unfused") == 0
    _assert_equal_dicts(load_module_checkpoint(tmp_path / "ck_again")[0],
                        load_module_checkpoint(tmp_path / "ck_unfused")[0])
    # the checkpoint rebuilds the model, in either layout
    model = model_from_module_checkpoint(tmp_path / "ck", fused_moe_mlp=False)
    assert model.config == hf.load_model(src, fused_moe_mlp=False).config
    _assert_equal_dicts(module_state(model), load_module_checkpoint(tmp_path / "ck_unfused")[0])


def test_cli_whole_model_bad_input(tmp_path, capsys):
    src = _write_hf_model(tmp_path, "qwen2_moe")
    assert cli.main(["convert", str(src), str(tmp_path / "ck")]) == 0
    layers, _ = _write_hf(tmp_path, "qwen3_moe", "layers_only")
    from fusedmoe.checkpoint.module_checkpoint import save_model_checkpoint
    from fusedmoe.model import Decoder, ModelConfig

    toy = Decoder(ModelConfig(moe=fusedmoe.MoEConfig(num_experts=4, emb_dim=8, mlp_dim=4)),
                  rngs=nnx.Rngs(0))
    save_model_checkpoint(tmp_path / "toy", toy)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    (tmp_path / "holed").mkdir()
    save_file(tensors, str(tmp_path / "holed" / "model.safetensors"))
    (tmp_path / "holed" / "config.json").write_text((src / "config.json").read_text())
    ck = str(tmp_path / "ck")
    cases = [
        ([str(tmp_path / "holed"), str(tmp_path / "x")],
         "missing tensor 'model.layers.1.self_attn.q_proj.weight'"),
        # a config of MoE layers only: a whole model needs more fields
        ([str(layers), str(tmp_path / "x")], "missing field 'max_position_embeddings'"),
        ([ck, str(tmp_path / "x"), "--packed"], "--packed: applies to checkpoints of MoE "
                                                "layers"),
        ([ck, str(tmp_path / "x"), "--layer", "0"], "--layer: applies to checkpoints of MoE"),
        ([ck, str(tmp_path / "x"), "--model-type", "mixtral"],
         "--model-type: got 'mixtral', but"),
        ([ck, str(tmp_path / "x"), "--moe-layers"], "--moe-layers: applies to a Hugging Face"),
        ([str(tmp_path / "toy"), str(tmp_path / "x")], "model_type is empty"),
    ]
    layer_only = [t for t in hf.SUPPORTED_MODEL_TYPES if t not in hf.WHOLE_MODEL_TYPES]
    if layer_only:  # families whose whole models do not load (yet)
        other, _ = _write_hf(tmp_path, layer_only[0], "other")
        cases.append(([str(other), str(tmp_path / "x")],
                      f"whole {layer_only[0]} models do not load yet"))
    before = _listing(tmp_path)
    for argv, message in cases:
        assert cli.main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
        assert _listing(tmp_path) == before, argv


def test_hf_sharded_checkpoint(tmp_path):
    """Tensors spread over several shards (as large models are) load the same."""
    from safetensors.numpy import save_file

    path, tensors = _write_hf(tmp_path, "gpt_oss")
    whole = hf.load_moe_layer(path, 1, fused_moe_mlp=False)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((path / "config.json").read_text())
    names = sorted(tensors)
    for i, part in enumerate((names[::2], names[1::2])):
        save_file({n: tensors[n] for n in part},
                  str(sharded / f"model-0000{i + 1}-of-00002.safetensors"))
    _assert_equal_dicts(module_state(hf.load_moe_layer(sharded, 1, fused_moe_mlp=False)),
                        module_state(whole))


def test_atomic_files_get_the_mode_open_would_give(tmp_path):
    # mkstemp makes its temporaries 0600; the renamed file must not stay that
    # private (benchmark JSON, plots, checkpoints are meant to be shared).
    from fusedmoe.atomic import write_json

    umask = os.umask(0o022)
    try:
        import fusedmoe.atomic as atomic

        old_mode = atomic._FILE_MODE
        atomic._FILE_MODE = atomic._file_mode()
        try:
            write_json(tmp_path / "rows.json", {"a": 1})
        finally:
            atomic._FILE_MODE = old_mode
    finally:
        os.umask(umask)
    assert (tmp_path / "rows.json").stat().st_mode & 0o777 == 0o644
