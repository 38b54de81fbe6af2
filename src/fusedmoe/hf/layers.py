"""One MoE layer (or a few) in and out of Hugging Face checkpoints.

:func:`load_moe_layer` reads ``config.json`` and the safetensors shards of a
Hugging Face model directory, builds the matching :class:`MoEConfig` and loads
one decoder layer's MoE block. No torch or transformers needed.

Families (``model_type``): ``mixtral``, ``qwen2_moe`` (shared expert with a
sigmoid gate), ``qwen3_moe``, ``olmoe``, ``deepseek_v3`` (sigmoid scores,
``e_score_correction_bias``, grouped top-k, routed scaling, shared experts;
its first ``first_k_dense_replace`` layers are dense) and ``gpt_oss``
(interleaved gate/up, biases, clamped SwiGLU, router bias, softmax after
top-k). Expert tensors are read in either form transformers uses: per expert
(``experts.E.gate_proj.weight`` / Mixtral's ``w1``/``w3``/``w2``, what
``save_pretrained`` writes) or packed (v5 ``experts.gate_up_proj``,
``experts.down_proj``, what the in-memory model holds).

:func:`export_moe_layer` goes the other way: a layer's tensors under their HF
names, which :func:`save_safetensors` writes (atomically) as a model directory.
All problems with the input are reported before anything is built or written,
naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fusedmoe.checkpoint import layouts
from fusedmoe.checkpoint.layouts import Layout, Piece
from fusedmoe.config import MoEConfig
from fusedmoe.errors import CheckpointError
from fusedmoe.hf.config import (
    check_layer,
    moe_config,
    moe_layer_indices,
    read_hf_config,
    refuse_quantized,
)
from fusedmoe.hf.families import Family, family_of
from fusedmoe.hf.families import layer_prefix as _prefix
from fusedmoe.hf.fill import fill_tree, tree_set
from fusedmoe.hf.safetensors_io import SafetensorsDir


def module_state(module) -> dict[str, Any]:
    """``nnx.state(module)`` as a nested dict of numpy arrays (string keys)."""
    import jax
    from flax import nnx

    def to_numpy(tree):
        return {str(k): to_numpy(v) if isinstance(v, Mapping) else np.asarray(jax.device_get(v))
                for k, v in tree.items()}

    return to_numpy(nnx.state(module).to_pure_dict())


# ----------------------------------------------------------------------------- names
def expected_tensors(
    family: Family, cfg: MoEConfig, layer: int, *, packed: bool, block: str | None = None
) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for one MoE block of ``cfg`` (``packed``: v5/gpt-oss
    expert tensors; else per expert)."""
    g, k, n, ns = cfg.num_experts, cfg.emb_dim, cfg.mlp_dim, cfg.shared_mlp_dim
    p = _prefix(layer, block or family.blocks[0])
    out = {f"{p}{family.router}.weight": (g, k)}
    if cfg.router_bias:
        out[f"{p}{family.router}.bias"] = (g,)
    if cfg.routing_selection_bias:
        out[f"{p}{family.router}.e_score_correction_bias"] = (g,)
    if family.packed is Layout.GPT_OSS:
        out.update({f"{p}experts.gate_up_proj": (g, k, 2 * n),
                    f"{p}experts.gate_up_proj_bias": (g, 2 * n),
                    f"{p}experts.down_proj": (g, n, k),
                    f"{p}experts.down_proj_bias": (g, k)})
    elif packed:
        out.update({f"{p}experts.gate_up_proj": (g, 2 * n, k), f"{p}experts.down_proj": (g, k, n)})
    else:
        gate, up, down = family.expert_names
        for e in range(g):
            out[f"{p}experts.{e}.{gate}.weight"] = (n, k)
            out[f"{p}experts.{e}.{up}.weight"] = (n, k)
            out[f"{p}experts.{e}.{down}.weight"] = (k, n)
    if family.shared and ns:
        out.update({f"{p}{family.shared}.gate_proj.weight": (ns, k),
                    f"{p}{family.shared}.up_proj.weight": (ns, k),
                    f"{p}{family.shared}.down_proj.weight": (k, ns)})
    if family.shared_gate and cfg.shared_expert_gate:
        out[f"{p}{family.shared_gate}.weight"] = (1, k)
    return out


_QUANT_SUFFIXES = ("_blocks", "_scales", "weight_scale_inv", ".qweight", ".scales")


def _find_block(st: SafetensorsDir, family: Family, layer: int) -> tuple[str, bool]:
    """(block name, packed?) of a layer's MoE tensors in ``st``."""
    for block in family.blocks:
        p = _prefix(layer, block)
        names = st.names(p)
        if not names:
            continue
        quant = [x for x in names if x.endswith(_QUANT_SUFFIXES)]
        if quant:
            raise CheckpointError(
                f"{st.path}/{st.where(quant[0])}: tensor {quant[0]!r} is quantized; only "
                "float32/bfloat16/float16 checkpoints are read (dequantize first)"
            )
        packed = f"{p}experts.gate_up_proj" in st or f"{p}experts.down_proj" in st
        return block, packed
    tried = ", ".join(repr(_prefix(layer, b)) for b in family.blocks)
    raise CheckpointError(
        f"{st.path}: no tensors of layer {layer}'s MoE block (looked for names starting "
        f"with {tried})"
    )


def check_layer_tensors(
    path: str | os.PathLike, layer: int, cfg: MoEConfig, *, st: SafetensorsDir | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, tuple[int, ...]], Family, str, bool]:
    """Check one layer's MoE tensors on the shard headers (no data read):
    ``(expected name -> shape, family, block, packed)``.

    Every expected tensor must exist, with the shape ``cfg`` implies and a float dtype.
    """
    hf_config = hf_config if hf_config is not None else read_hf_config(path)
    family = family_of(hf_config, f"{path}/config.json")
    st = st or SafetensorsDir(path)
    block, packed = _find_block(st, family, layer)
    expected = expected_tensors(family, cfg, layer, packed=packed, block=block)
    st.check_expected(
        expected, whose=f"for layer {layer} (model_type {family.model_type})",
        implied_by=f"num_experts={cfg.num_experts}, hidden_size={cfg.emb_dim}, "
                   f"expert mlp dim={cfg.mlp_dim}"
                   + (f", shared mlp dim={cfg.shared_mlp_dim}" if cfg.shared_mlp_dim else ""))
    return expected, family, block, packed


def read_layer_tensors(
    path: str | os.PathLike, layer: int, cfg: MoEConfig, *, st: SafetensorsDir | None = None,
    hf_config: Mapping[str, Any] | None = None,
) -> tuple[dict[str, np.ndarray], Family, str, bool]:
    """Check (:func:`check_layer_tensors`), then read one layer's MoE tensors:
    ``(tensors, family, block, packed)``."""
    st = st or SafetensorsDir(path)
    expected, family, block, packed = check_layer_tensors(
        path, layer, cfg, st=st, hf_config=hf_config
    )
    return {name: st.get(name) for name in expected}, family, block, packed


# ----------------------------------------------------------------------------- HF <-> state
def layer_pieces(
    family: Family, cfg: MoEConfig, layer: int, *, block: str | None = None, packed: bool = False,
) -> list[Piece]:
    """Where each HF tensor of one MoE block (those :func:`expected_tensors` names)
    lands in the unfused state of :class:`fusedmoe.MoE` (``gate/kernel``, ``wi_0``,
    ``shared_wo``, ...): the experts as :mod:`fusedmoe.checkpoint.layouts` says, the
    router and shared experts transposed (torch's ``[out, in]``)."""
    p = _prefix(layer, block or family.blocks[0])
    r = f"{p}{family.router}."
    out = [Piece(r + "weight", "gate/kernel", view=layouts.transposed)]
    if cfg.router_bias:
        out.append(Piece(r + "bias", "gate/bias"))
    if cfg.routing_selection_bias:
        out.append(Piece(r + "e_score_correction_bias", "selection_bias"))
    if family.packed is Layout.GPT_OSS:
        experts = layouts.gpt_oss_pieces(bias=True)  # gpt-oss always has expert biases
    elif packed:
        experts = layouts.hf_packed_pieces()
    else:
        experts = layouts.hf_per_expert_pieces(cfg.num_experts, family.expert_names)
    out += [piece.renamed(source_prefix=p + "experts.") for piece in experts]
    if family.shared and cfg.shared_mlp_dim:
        s = f"{p}{family.shared}."
        out += [Piece(s + "gate_proj.weight", "shared_wi_0", view=layouts.transposed),
                Piece(s + "up_proj.weight", "shared_wi_1", view=layouts.transposed),
                Piece(s + "down_proj.weight", "shared_wo", view=layouts.transposed)]
    if family.shared_gate and cfg.shared_expert_gate:
        out.append(Piece(f"{p}{family.shared_gate}.weight", "shared_gate/kernel",
                         view=layouts.transposed))
    return out


def hf_to_state(
    tensors: Mapping[str, np.ndarray], family: Family, cfg: MoEConfig, layer: int, *,
    block: str | None = None, packed: bool = False,
) -> dict[str, Any]:
    """A layer's HF tensors -> the unfused nested state dict of :class:`fusedmoe.MoE`
    (fresh arrays in the tensors' dtype; see :func:`layer_pieces`)."""
    pieces = layer_pieces(family, cfg, layer, block=block, packed=packed)
    missing = sorted({piece.source for piece in pieces} - set(tensors))
    if missing:
        raise KeyError(f"hf_to_state: layer {layer} ({family.model_type}) is missing tensor(s) "
                       f"{missing[:3]}" + (" ..." if len(missing) > 3 else ""))
    state: dict[str, Any] = {}
    for path, array in layouts.assemble(pieces, tensors).items():
        tree_set(state, tuple(path.split("/")), array)
    return state


def _load_layer(st: SafetensorsDir, cfg: MoEConfig, family: Family, layer: int, block: str,
                packed: bool):
    """One MoE block of ``st`` as a :class:`fusedmoe.MoE`, each parameter filled in
    place and handed to the device before the next (:mod:`fusedmoe.hf.fill`)."""
    from flax import nnx

    from fusedmoe.layer import MoE

    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))
    pieces = layer_pieces(family, cfg, layer, block=block, packed=packed)
    nnx.replace_by_pure_dict(state, fill_tree(pieces, state.to_pure_dict(), st.get))
    return nnx.merge(graphdef, state)


def state_to_hf(
    state: Mapping[str, Any], model_type: str, layer: int = 0, *, packed: bool = False,
) -> dict[str, np.ndarray]:
    """The nested state dict of one :class:`fusedmoe.MoE` (fused or unfused) -> HF tensors
    of decoder layer ``layer``. ``packed`` writes v5 packed expert tensors (with the
    ``mlp`` block name); otherwise per-expert tensors under the names ``save_pretrained``
    writes. gpt-oss always uses its own (packed, interleaved) layout."""
    from fusedmoe.checkpoint.fusion import unfuse_state

    fam = family_of({"model_type": model_type}, "model_type")
    s = unfuse_state({k: v for k, v in state.items()})
    s = {k: (dict(v) if isinstance(v, Mapping) else np.asarray(v)) for k, v in s.items()}
    block = "mlp" if packed or fam.packed is Layout.GPT_OSS else fam.export_block
    p = _prefix(layer, block)
    out = {f"{p}{fam.router}.weight": np.ascontiguousarray(np.asarray(s["gate"]["kernel"]).T)}
    if "bias" in s["gate"]:
        if fam.model_type != "gpt_oss":
            raise CheckpointError(f"{model_type}: has no router bias, but the layer has one")
        out[f"{p}{fam.router}.bias"] = np.asarray(s["gate"]["bias"])
    if "selection_bias" in s:
        if fam.model_type != "deepseek_v3":
            raise CheckpointError(f"{model_type}: has no selection bias, but the layer has one")
        out[f"{p}{fam.router}.e_score_correction_bias"] = np.asarray(s["selection_bias"])
    ex = {k: np.asarray(s[k]) for k in ("wi_0", "wi_1", "wo", "wi_0_bias", "wi_1_bias", "wo_bias")
          if k in s}
    if fam.packed is Layout.GPT_OSS:
        experts = layouts.unfused_to_gpt_oss(ex)
    elif "wi_0_bias" in ex:
        raise CheckpointError(f"{model_type}: has no expert biases, but the layer has mlp_bias")
    elif packed:
        experts = layouts.unfused_to_hf_packed(ex)
    else:
        experts = layouts.unfused_to_hf_per_expert(ex, fam.expert_names)
    out.update({f"{p}experts.{k}": v for k, v in experts.items()})
    if "shared_wo" in s:
        if not fam.shared:
            raise CheckpointError(f"{model_type}: has no shared experts, but the layer has some")
        sh = f"{p}{fam.shared}."
        out[sh + "gate_proj.weight"] = np.ascontiguousarray(np.asarray(s["shared_wi_0"]).T)
        out[sh + "up_proj.weight"] = np.ascontiguousarray(np.asarray(s["shared_wi_1"]).T)
        out[sh + "down_proj.weight"] = np.ascontiguousarray(np.asarray(s["shared_wo"]).T)
    if "shared_gate" in s:
        if not fam.shared_gate:
            raise CheckpointError(f"{model_type}: has no shared-expert gate, but the layer has one")
        out[f"{p}{fam.shared_gate}.weight"] = np.ascontiguousarray(
            np.asarray(s["shared_gate"]["kernel"]).T
        )
    return out


# ----------------------------------------------------------------------------- public API
def load_moe_layer(
    path: str | os.PathLike, layer: int, *, fused_moe_mlp: bool = True, **overrides: Any
):
    """Load decoder layer ``layer``'s MoE block of the HF model at ``path`` as a
    :class:`fusedmoe.MoE` (fused ``wi [G,K,2,N]`` by default).

    ``overrides`` set :class:`MoEConfig` fields (e.g. ``gmm_backend``, ``dtype``,
    ``weight_dtype``, which default to the checkpoint's dtype).
    """

    hf_config = read_hf_config(path)
    where = f"{path}/config.json"
    family_of(hf_config, where)
    refuse_quantized(hf_config, where)
    check_layer(hf_config, layer, where)
    cfg = moe_config(hf_config, fused_moe_mlp=fused_moe_mlp, **overrides)
    st = SafetensorsDir(path)
    _, family, block, packed = check_layer_tensors(path, layer, cfg, st=st, hf_config=hf_config)
    return _load_layer(st, cfg, family, layer, block, packed)


_COMMON_FIXED = dict(router_bias=False, mlp_bias=False, routing_selection_bias=False,
                    softmax_after_topk=False, score_func="softmax", n_routing_groups=1,
                    routed_scaling_factor=1.0, shared_expert_gate=False, shared_mlp_dim=0)
# The MoEConfig fields each family fixes (the others go into config.json).
_FIXED: dict[str, dict[str, Any]] = {
    "mixtral": dict(_COMMON_FIXED, norm_topk_prob=True),
    "qwen2_moe": {k: v for k, v in _COMMON_FIXED.items()
                  if k not in ("shared_expert_gate", "shared_mlp_dim")} | {
                      "shared_expert_gate": True},
    "qwen3_moe": dict(_COMMON_FIXED),
    "olmoe": dict(_COMMON_FIXED),
    "deepseek_v3": dict(router_bias=False, mlp_bias=False, routing_selection_bias=True,
                        softmax_after_topk=False, score_func="sigmoid",
                        shared_expert_gate=False),
    "gpt_oss": dict(_COMMON_FIXED, router_bias=True, mlp_bias=True, softmax_after_topk=True,
                    mlp_activations="clamped_swiglu"),
}


def check_exportable(cfg: MoEConfig, model_type: str) -> None:
    """A clear error if a layer of ``cfg`` would compute something else as ``model_type``
    (e.g. a sigmoid router exported as Mixtral, which always uses softmax)."""
    family_of({"model_type": model_type}, "model_type")
    bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in _FIXED[model_type].items()
           if getattr(cfg, k) != v]
    if model_type != "gpt_oss" and cfg.mlp_activations == "clamped_swiglu":
        bad.append("mlp_activations='clamped_swiglu' (only gpt_oss has it)")
    if model_type == "qwen2_moe" and cfg.shared_mlp_dim == 0:
        bad.append("shared_experts=0 (qwen2_moe has a shared expert)")
    if model_type == "deepseek_v3" and cfg.shared_mlp_dim % cfg.mlp_dim:
        bad.append(f"shared mlp dim {cfg.shared_mlp_dim} (needs a multiple of mlp_dim)")
    if bad:
        raise CheckpointError(
            f"{model_type}: this layer cannot be exported as {model_type}; it differs in "
            + ", ".join(bad)
        )


def export_moe_layer(
    moe, model_type: str, *, layer: int = 0, packed: bool = False
) -> dict[str, np.ndarray]:
    """``moe``'s tensors under the HF names of decoder layer ``layer`` of ``model_type``
    (per expert, as ``save_pretrained`` writes them, or v5 ``packed``). Refuses a layer
    whose routing or FFN ``model_type`` cannot express (:func:`check_exportable`)."""
    check_exportable(moe.config, model_type)
    return state_to_hf(module_state(moe), model_type, layer, packed=packed)


def save_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], *,
    hf_config: Mapping[str, Any] | None = None, overwrite: bool = False,
) -> Path:
    """Write ``tensors`` as ``path/model.safetensors`` (and ``config.json`` when given),
    atomically: into a temporary directory next to ``path``, renamed at the end."""
    from safetensors.numpy import save_file

    from fusedmoe.atomic import atomic_directory

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    encoded = json.dumps(dict(hf_config), indent=2, sort_keys=True) if hf_config else None
    with atomic_directory(path, overwrite=overwrite) as tmp:
        save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if encoded is not None:
            (tmp / "config.json").write_text(encoded + "\n")
    return Path(path).absolute()


def load_moe_layers(
    path: str | os.PathLike, layers: list[int] | None = None, *, fused_moe_mlp: bool = True,
    **overrides: Any,
) -> dict[int, Any]:
    """Every MoE layer (or ``layers``) of the model at ``path``: ``{index: MoE}``. All
    layers are checked before any is built."""

    hf_config = read_hf_config(path)
    where = f"{path}/config.json"
    family_of(hf_config, where)
    refuse_quantized(hf_config, where)
    layers = moe_layer_indices(hf_config) if layers is None else list(layers)
    for i in layers:
        check_layer(hf_config, i, where)
    cfg = moe_config(hf_config, fused_moe_mlp=fused_moe_mlp, **overrides)
    st = SafetensorsDir(path)
    for i in layers:  # every layer checked on the headers before any data is read
        check_layer_tensors(path, i, cfg, st=st, hf_config=hf_config)
    out = {}
    for i in layers:
        _, family, block, packed = check_layer_tensors(path, i, cfg, st=st, hf_config=hf_config)
        out[i] = _load_layer(st, cfg, family, i, block, packed)
    return out
