"""Whole Hugging Face models in and out: :func:`load_model`, :func:`save_model`.

Loading reads ``config.json`` (:func:`fusedmoe.hf.config.model_config`), then
every shard's header, and checks that each tensor the model needs is there
with the shape the config implies, a float dtype and no quantization, before
any data is read or any module built. The model is then built abstractly and
filled one parameter at a time (:mod:`fusedmoe.hf.fill`): each parameter's
final array (fused or not, in the model's dtype) is allocated once, every
tensor that feeds it is read and written straight into its slot (an expert's
gate transposed into ``wi[e, :, 0, :]``, say), and the array goes to the device
before the next is started. So host memory stays near the model's size: the
parameters, plus the one being filled and one tensor.

Saving writes what ``save_pretrained`` writes (per-expert names, no lm_head
when tied, shards with an index above ``max_shard_size``) into a temporary
directory renamed into place at the end: fused layers are unfused on the way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fusedmoe.checkpoint import layouts
from fusedmoe.checkpoint.layouts import Piece
from fusedmoe.errors import CheckpointError
from fusedmoe.hf.config import _DTYPES, model_config, model_hf_config, mtp_layers, read_hf_config
from fusedmoe.hf.families import (
    DENSE_MLP_TENSORS,
    FAMILIES,
    IGNORED_SUFFIXES,
    MODEL_TENSORS,
    Family,
    family_of,
    layer_prefix,
    layer_tensors,
)
from fusedmoe.hf.fill import fill_tree
from fusedmoe.hf.fill import tree_leaves as _leaves
from fusedmoe.hf.fill import tree_path as _path
from fusedmoe.hf.layers import (
    _QUANT_SUFFIXES,
    _find_block,
    check_exportable,
    expected_tensors,
    layer_pieces,
    state_to_hf,
)
from fusedmoe.hf.safetensors_io import SafetensorsDir, write_shards

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes per shard, as transformers' save_pretrained did


# ----------------------------------------------------------------------------- layouts
def _torch_layout(keys: tuple, array: np.ndarray) -> np.ndarray:
    """An nnx ``kernel`` is torch's ``weight`` transposed; the rest is the same."""
    return np.ascontiguousarray(_torch_view(keys)(array))


def _torch_view(keys: tuple):
    return layouts.transposed if keys[-1] == "kernel" else layouts.same


# ----------------------------------------------------------------------------- the plan
def _block_tensor_names(cfg, family: Family, layer: int, block_like: Mapping,
                        moe_block: tuple[str, bool] | None) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of decoder layer ``layer``'s tensors (``moe_block``: the MoE
    block's name and whether its experts are packed; None for a dense layer)."""
    p, names = layer_prefix(layer), layer_tensors(cfg.attention)
    out = {}
    for keys, leaf in _leaves(block_like):
        rel = _path(keys)
        if keys[0] == "ffn":
            continue
        if rel not in names:
            raise CheckpointError(
                f"{cfg.model_type}: the model's parameter {rel!r} has no Hugging Face name"
            )
        shape = tuple(leaf.shape)
        out[p + names[rel]] = shape[::-1] if keys[-1] == "kernel" else shape
    if moe_block is None:
        k, n = cfg.emb_dim, cfg.ffn_dim
        gate, up, down = (p + name for name in DENSE_MLP_TENSORS)
        out.update({gate: (n, k), up: (n, k), down: (k, n)})
    else:
        block, packed = moe_block
        out.update(expected_tensors(family, cfg.moe, layer, packed=packed, block=block))
    return out


def _top_tensor_names(cfg, like: Mapping) -> dict[str, tuple[int, ...]]:
    out = {}
    for keys, leaf in _leaves({k: v for k, v in like.items() if k != "blocks"}):
        shape = tuple(leaf.shape)
        out[MODEL_TENSORS[_path(keys)]] = shape[::-1] if keys[-1] == "kernel" else shape
    return out


def _abstract(cfg, mesh=None):
    from flax import nnx

    from fusedmoe.model import Decoder

    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), mesh=mesh)))


def check_model_tensors(st: SafetensorsDir, cfg, family: Family, like: Mapping):
    """Check every tensor of the model on the shard headers (no data read):
    ``{layer: (MoE block name, packed?)}``. Refuses missing, misshapen, quantized,
    non-float and unexpected tensors, naming the file and the tensor."""
    quant = [n for n in st.names() if n.endswith(_QUANT_SUFFIXES)]
    if quant:
        raise CheckpointError(
            f"{st.path / st.where(quant[0])}: tensor {quant[0]!r} is quantized; only "
            "float32/bfloat16/float16 checkpoints are read (dequantize first)"
        )
    moe_blocks = {i: _find_block(st, family, i) for i in cfg.moe_layers}
    expected = _top_tensor_names(cfg, like)
    for i in range(cfg.num_layers):
        expected.update(_block_tensor_names(cfg, family, i, like["blocks"][i], moe_blocks.get(i)))
    st.check_expected(expected, whose=f"(model_type {family.model_type})")
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()
    # DeepSeek-V3's multi-token prediction modules follow the last layer; not computed
    # (see hf.config._refuse_mtp), so not read.
    mtp = tuple(layer_prefix(cfg.num_layers + i) for i in range(mtp_layers(cfg.extra)))
    unexpected = [n for n in st.names() if n not in expected and n not in tied_head
                  and not n.endswith(IGNORED_SUFFIXES) and not (mtp and n.startswith(mtp))]
    if unexpected:
        raise CheckpointError(
            f"{st.path / st.where(unexpected[0])}: {len(unexpected)} tensor(s) the model of "
            f"config.json does not have, e.g. {unexpected[:3]} (is num_hidden_layers, or "
            "another field, different from the checkpoint's?)"
        )
    return moe_blocks


# ----------------------------------------------------------------------------- loading
def _model_pieces(cfg, family: Family, like: Mapping,
                  moe_blocks: Mapping[int, tuple[str, bool]]) -> list[Piece]:
    """Where every tensor of the checkpoint lands in the decoder's state (paths as
    ``blocks/0/attn/q/kernel``; MoE layers' as unfused names, see :func:`layer_pieces`)."""
    pieces = [Piece(MODEL_TENSORS[_path(keys)], _path(keys), view=_torch_view(keys))
              for keys, _ in _leaves({k: v for k, v in like.items() if k != "blocks"})]
    for i in range(cfg.num_layers):
        p, names, at = layer_prefix(i), layer_tensors(cfg.attention), f"blocks/{i}/"
        pieces += [Piece(p + names[_path(keys)], at + _path(keys), view=_torch_view(keys))
                   for keys, _ in _leaves(like["blocks"][i]) if keys[0] != "ffn"]
        if i in moe_blocks:
            block, packed = moe_blocks[i]
            pieces += [piece.renamed(target_prefix=at + "ffn/")
                       for piece in layer_pieces(family, cfg.moe, i, block=block, packed=packed)]
        else:  # DenseFFN: w_in [K, 2, N] is (gate, up) stacked, w_out [N, K]
            gate, up, down = (p + name for name in DENSE_MLP_TENSORS)
            pieces += [Piece(gate, at + "ffn/w_in", (slice(None), 0), layouts.transposed),
                       Piece(up, at + "ffn/w_in", (slice(None), 1), layouts.transposed),
                       Piece(down, at + "ffn/w_out", view=layouts.transposed)]
    return pieces


def _checkpoint_dtype(st: SafetensorsDir) -> str:
    return _DTYPES[st.dtype(MODEL_TENSORS["embed/embedding"])]


def load_model(path: str | os.PathLike, *, fused_moe_mlp: bool = True, dtype=None, mesh=None,
               **overrides: Any):
    """The Hugging Face model at ``path`` as a :class:`fusedmoe.model.Decoder`.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or shards
        with ``model.safetensors.index.json``) of a ``mixtral``, ``qwen2_moe``,
        ``qwen3_moe``, ``olmoe``, ``deepseek_v3`` or ``gpt_oss`` model.
      fused_moe_mlp: store each MoE layer's gate and up projections as one
        ``wi [G, K, 2, N]`` (the default) or as two.
      dtype: parameters and compute; None keeps the checkpoint's own dtype.
      mesh: a ``jax.sharding.Mesh`` with ``data``/``expert``/``tensor`` axes, on which
        the parameters are placed (:mod:`fusedmoe.model.sharding`) and the model runs.
      overrides: :class:`ModelConfig` or :class:`MoEConfig` fields (``gmm_backend``,
        ``max_seq_len``, ...).
    """
    import jax
    from flax import nnx

    path = Path(path)
    hf_config = read_hf_config(path)
    where = str(path / "config.json")
    family = family_of(hf_config, where)
    dtype = _dtype_name(dtype)
    # The config is mapped (and refused) before any shard is opened.
    cfg = model_config(hf_config, fused_moe_mlp=fused_moe_mlp, dtype=dtype or "float32",
                       where=where, **overrides)
    st = SafetensorsDir(path)
    _, state = _abstract(cfg)
    moe_blocks = check_model_tensors(st, cfg, family, state.to_pure_dict())
    if dtype is None:
        dtype = _checkpoint_dtype(st)
        cfg = cfg.with_moe(dtype=dtype, weight_dtype=overrides.get("weight_dtype", dtype))
    graphdef, state = _abstract(cfg, mesh)
    like = state.to_pure_dict()
    nnx.replace_by_pure_dict(state, fill_tree(_model_pieces(cfg, family, like, moe_blocks),
                                              like, st.get))
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        from fusedmoe.model.sharding import place

        place(model, mesh)
    jax.block_until_ready(nnx.state(model))
    return model


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    import jax.numpy as jnp

    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in _DTYPES.values():
        raise ValueError(f"dtype: got {dtype!r}, expected one of {sorted(_DTYPES.values())}")
    return name


# ----------------------------------------------------------------------------- saving
def check_model_exportable(cfg) -> Family:
    """The family ``cfg`` is written as; a clear error when it computes something
    that family's transformers code would not."""
    if not cfg.model_type:
        raise CheckpointError(
            "model: config.model_type is empty (fusedmoe's own model); only models of a "
            "Hugging Face family (loaded with hf.load_model, or configured with model_type) "
            "can be saved in the Hugging Face format"
        )
    family = FAMILIES.get(cfg.model_type)
    if family is None or family.causal_lm is None:
        raise CheckpointError(f"model: model_type {cfg.model_type!r}: whole models of it cannot "
                              "be saved yet")
    bad = []
    if cfg.attention != family.attention:
        bad.append(f"attention={cfg.attention!r} (needs {family.attention!r})")
    elif cfg.fused_qkv and cfg.attention != "mla":
        bad.append("fused_qkv=True (needs separate q/k/v)")
    if cfg.qk_norm != family.qk_norm:
        bad.append(f"qk_norm={cfg.qk_norm!r} (needs {family.qk_norm!r})")
    if family.bias_field is None and (cfg.qkv_bias or cfg.out_bias):
        bad.append("attention biases (it has none)")
    if family.bias_field == "qkv_bias" and cfg.out_bias:
        bad.append("out_bias=True (it has q/k/v biases only)")
    if family.bias_field == "attention_bias" and cfg.qkv_bias != cfg.out_bias:
        bad.append("qkv_bias != out_bias (one attention_bias switches all four)")
    if cfg.clip_qkv and not family.clip_qkv:
        bad.append(f"clip_qkv={cfg.clip_qkv}")
    if cfg.sliding_window and family.sliding == "none":
        bad.append(f"sliding_window={cfg.sliding_window}")
    if family.sliding == "all" and len({cfg.layer_type(i) for i in range(cfg.num_layers)}) > 1:
        bad.append("layer_types mixing sliding and full layers")
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if dense and not family.dense_layers:
        bad.append(f"dense layers {dense}")
    if family.model_type == "deepseek_v3" and dense != list(range(len(dense))):
        bad.append(f"dense layers {dense} (first_k_dense_replace: only the first layers)")
    if cfg.tie_embeddings and cfg.scale_tied_logits:
        bad.append("scale_tied_logits=True")
    if bad:
        raise CheckpointError(
            f"model: cannot be saved as {cfg.model_type}; it differs in " + ", ".join(bad)
        )
    check_exportable(cfg.moe, cfg.model_type)
    return family


def _export_specs(cfg, family: Family, like: Mapping):
    """``[(group, {HF name: shape})]`` in the order the files hold them."""
    export = {i: (family.export_block, False) for i in cfg.moe_layers}
    top = _top_tensor_names(cfg, like)
    groups = [("embed", {MODEL_TENSORS["embed/embedding"]: top[MODEL_TENSORS["embed/embedding"]]})]
    for i in range(cfg.num_layers):
        groups.append((i, _block_tensor_names(cfg, family, i, like["blocks"][i], export.get(i))))
    groups.append(("head", {n: s for n, s in top.items()
                            if n != MODEL_TENSORS["embed/embedding"]}))
    return groups


def _export_group(cfg, family: Family, state: Mapping, group) -> dict[str, np.ndarray]:
    """The HF tensors of one group (``"embed"``, ``"head"`` or a layer index)."""
    import jax

    host = lambda a: np.asarray(jax.device_get(a))  # noqa: E731
    if group in ("embed", "head"):
        names = ["embed"] if group == "embed" else [k for k in state if k not in ("embed",
                                                                                   "blocks")]
        return {MODEL_TENSORS[_path(keys)]: _torch_layout(keys, host(v))
                for keys, v in _leaves({k: state[k] for k in names})}
    block, p, names = state["blocks"][group], layer_prefix(group), layer_tensors(cfg.attention)
    out = {p + names[_path(keys)]: _torch_layout(keys, host(v))
           for keys, v in _leaves({k: v for k, v in block.items() if k != "ffn"})}
    ffn = block["ffn"]
    if cfg.is_moe_layer(group):
        out.update(state_to_hf(_to_host_tree(ffn), cfg.model_type, group, packed=False))
    else:
        w_in, w_out = host(ffn["w_in"]), host(ffn["w_out"])
        gate, up, down = (p + name for name in DENSE_MLP_TENSORS)
        out.update({gate: np.ascontiguousarray(w_in[:, 0].T),
                    up: np.ascontiguousarray(w_in[:, 1].T),
                    down: np.ascontiguousarray(w_out.T)})
    return out


def _to_host_tree(tree: Mapping) -> dict:
    import jax

    return {str(k): _to_host_tree(v) if isinstance(v, Mapping) else np.asarray(jax.device_get(v))
            for k, v in tree.items()}


def save_model(model, path: str | os.PathLike, *, overwrite: bool = False,
               max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``model`` (a :class:`fusedmoe.model.Decoder` of a Hugging Face family)
    as a Hugging Face model directory: ``config.json`` and the safetensors
    ``save_pretrained`` writes, sharded with ``model.safetensors.index.json`` when
    the weights exceed ``max_shard_size`` bytes. Atomic: ``path`` appears complete
    or not at all. Returns the absolute path."""
    from flax import nnx

    from fusedmoe.atomic import atomic_directory

    if not isinstance(max_shard_size, int) or max_shard_size < 1:
        raise ValueError(f"max_shard_size: expected an int >= 1 (bytes), got {max_shard_size!r}")
    cfg = model.config
    family = check_model_exportable(cfg)
    state = nnx.state(model).to_pure_dict()
    groups = _export_specs(cfg, family, state)
    dtype = _np_dtype(cfg.moe.weight_dtype)  # every parameter is stored in it
    specs = [(name, shape, dtype) for _, names in groups for name, shape in names.items()]

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for group, names in groups:
            produced = _export_group(cfg, family, state, group)
            if set(produced) != set(names):
                raise RuntimeError(f"save_model: layer {group} produced {sorted(produced)}, "
                                   f"planned {sorted(names)}")
            for name in names:
                yield name, produced[name].astype(dtype, copy=False)

    hf_config = model_hf_config(cfg)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        write_shards(tmp, specs, tensors(), max_shard_bytes=max_shard_size)
    return Path(path).absolute()


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
