"""Module checkpoints: one module's state with its MoE configs, saved with orbax;
restored into a module, rebuilt as a :class:`fusedmoe.MoE` or a whole
:class:`fusedmoe.model.Decoder`, converted fused <-> unfused.

A module checkpoint is a directory::

    path/
      state/          the orbax checkpoint of the nested state dict
      fusedmoe.json   {"format", "version", "layout", "configs", "metadata"}

``configs`` maps the "/"-joined path of each :class:`fusedmoe.MoE` in the tree
("" for a lone layer, ``"layers/3"`` inside a model) to its :class:`MoEConfig`
as a dict, so :func:`moe_from_module_checkpoint` can rebuild a layer without being told its shape.
``layout`` is ``fusedmoe_fused`` or ``fusedmoe_unfused`` (or ``none`` for a tree
without MoE weights). A whole model (:func:`save_model_checkpoint`) also keeps
its :class:`~fusedmoe.model.ModelConfig` as ``metadata["model_config"]``, so
:func:`model_from_module_checkpoint` rebuilds it without being told its shape.

Writes are atomic: everything goes into a temporary directory next to the
target, which is renamed into place only when complete; a failure removes it
and leaves nothing behind.

(:mod:`fusedmoe.checkpoint.run_checkpoint` is the other checkpoint format: the
steps of a training run, with the optimizer's state.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fusedmoe.atomic import atomic_directory
from fusedmoe.checkpoint.fusion import fuse_state, unfuse_state
from fusedmoe.checkpoint.state import tree_layout, update_module
from fusedmoe.config import MoEConfig

FORMAT = "fusedmoe-checkpoint"
VERSION = 1
META_FILE = "fusedmoe.json"
STATE_DIR = "state"


# ----------------------------------------------------------------------------- helpers
def _to_numpy_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if not isinstance(key, str):
            key = str(key)
        out[key] = _to_numpy_tree(value) if isinstance(value, Mapping) else np.asarray(value)
    return out


def moe_configs(module) -> dict[str, MoEConfig]:
    """The config of every :class:`fusedmoe.MoE` in ``module`` by "/"-joined path."""
    from flax import nnx

    from fusedmoe.layer import MoE

    return {
        "/".join(str(p) for p in path): node.config
        for path, node in nnx.iter_graph(module)
        if isinstance(node, MoE)
    }


def module_state(module) -> dict[str, Any]:
    """``nnx.state(module)`` as a nested dict of numpy arrays."""
    from flax import nnx

    return _to_numpy_tree(nnx.state(module).to_pure_dict())


# ----------------------------------------------------------------------------- save / load
def save_module_checkpoint(
    path: str | os.PathLike,
    target,
    *,
    configs: Mapping[str, MoEConfig] | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``target`` (an nnx module or a nested dict of arrays) to ``path``, atomically.

    For a module the MoE configs are found in it; for a dict pass ``configs``
    (path -> :class:`MoEConfig`) to make :func:`moe_from_module_checkpoint` work.
    ``metadata`` is any JSON-serialisable mapping kept beside the state.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    if isinstance(target, nnx.Module):
        tree = module_state(target)
        found = moe_configs(target)
        configs = {**found, **(configs or {})}
    elif isinstance(target, Mapping):
        tree = _to_numpy_tree(target)
    else:
        raise TypeError(f"target: expected an nnx.Module or a nested dict, got {type(target)}")
    configs = dict(configs or {})
    for key, cfg in configs.items():
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"configs[{key!r}]: expected a MoEConfig, got {type(cfg).__name__}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "layout": tree_layout(tree),
        "configs": {k: c.to_dict() for k, c in configs.items()},
        "metadata": dict(metadata or {}),
    }
    encoded = json.dumps(meta, indent=2, sort_keys=True)  # fail before writing anything
    path = Path(path).absolute()
    with atomic_directory(path, overwrite=overwrite) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / STATE_DIR, tree)
        checkpointer.wait_until_finished()
        checkpointer.close()
        (tmp / META_FILE).write_text(encoded + "\n")
    return path


def read_module_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``fusedmoe.json`` of a module checkpoint; a clear error for anything else."""
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not meta_file.is_file() or not (path / STATE_DIR).is_dir():
        raise ValueError(
            f"{path}: not a fusedmoe checkpoint (expected {META_FILE} and {STATE_DIR}/ inside)"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return meta


def load_module_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, metadata)``: the nested dict of numpy arrays, as saved, and the
    ``fusedmoe.json`` contents (``configs`` as dicts)."""
    import orbax.checkpoint as ocp

    meta = read_module_checkpoint_meta(path)
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.restore(Path(path).absolute() / STATE_DIR)
    checkpointer.close()
    return _to_numpy_tree(tree), meta


def _subtree(tree: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    node = tree
    for part in [p for p in key.split("/") if p]:
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"checkpoint: no entry {key!r} in the state")
        node = node[part]
    return node


def restore_module_checkpoint(path: str | os.PathLike, module) -> None:
    """Load the module checkpoint at ``path`` into ``module`` in place (fused or
    unfused checkpoints both fit either kind of module)."""
    tree, _ = load_module_checkpoint(path)
    update_module(module, tree)


def moe_from_module_checkpoint(path: str | os.PathLike, key: str | None = None, *,
                               fused_moe_mlp: bool | None = None):
    """Rebuild the :class:`fusedmoe.MoE` saved at ``key`` ("" for a lone layer; may be
    omitted when the checkpoint holds one layer) from its saved config.
    ``fused_moe_mlp`` picks the layout of the result (default: as saved)."""
    tree, meta = load_module_checkpoint(path)
    configs = meta["configs"]
    if key is None:
        if len(configs) != 1:
            raise ValueError(
                f"{path}: holds {len(configs)} MoE layers {sorted(configs)}; pass key= to pick one"
            )
        key = next(iter(configs))
    if key not in configs:
        raise KeyError(f"{path}: no MoE layer {key!r}; saved layers: {sorted(configs)}")
    config = MoEConfig.from_dict(configs[key])
    if fused_moe_mlp is not None:
        config = config.replace(fused_moe_mlp=fused_moe_mlp)
    from fusedmoe.layer import MoE

    return MoE.from_state(config, _subtree(tree, key))


# ----------------------------------------------------------------------------- whole models
MODEL_CONFIG_KEY = "model_config"


def save_model_checkpoint(path: str | os.PathLike, model, *,
                          metadata: Mapping[str, Any] | None = None,
                          overwrite: bool = False) -> Path:
    """Save a whole :class:`fusedmoe.model.Decoder` (its state, the MoE configs of
    its layers, and its :class:`ModelConfig` in ``metadata["model_config"]``),
    atomically."""
    from fusedmoe.model import Decoder

    if not isinstance(model, Decoder):
        raise TypeError(f"model: expected a fusedmoe.model.Decoder, got {type(model).__name__}")
    metadata = {**(metadata or {}), MODEL_CONFIG_KEY: model.config.to_dict()}
    return save_module_checkpoint(path, model, metadata=metadata, overwrite=overwrite)


def is_model_checkpoint(meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's ``fusedmoe.json`` (as read) holds a whole model."""
    return MODEL_CONFIG_KEY in meta.get("metadata", {})


def model_from_module_checkpoint(path: str | os.PathLike, *,
                                 fused_moe_mlp: bool | None = None):
    """The whole :class:`fusedmoe.model.Decoder` saved at ``path``, built abstractly
    and filled with the saved state. ``fused_moe_mlp`` picks the layout of its MoE
    layers (default: as saved); either layout of the state fits."""
    from flax import nnx

    from fusedmoe.checkpoint.state import module_from_state
    from fusedmoe.model import Decoder, ModelConfig

    tree, meta = load_module_checkpoint(path)
    if not is_model_checkpoint(meta):
        raise ValueError(f"{path}: holds no whole model (no metadata.{MODEL_CONFIG_KEY} in "
                         f"{META_FILE}); it holds MoE layers {sorted(meta['configs'])}")
    config = ModelConfig.from_dict(meta["metadata"][MODEL_CONFIG_KEY])
    if fused_moe_mlp is not None:
        config = config.with_moe(fused_moe_mlp=fused_moe_mlp)
    return module_from_state(lambda: Decoder(config, rngs=nnx.Rngs(0)), _list_indices(tree))


def _list_indices(tree: Mapping[str, Any]) -> dict:
    """``tree`` with its digit keys as ints: orbax saves the blocks of a decoder
    (an ``nnx.List``, indexed by int) under string keys."""
    return {int(k) if isinstance(k, str) and k.isdigit() else k:
            _list_indices(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# ----------------------------------------------------------------------------- conversion
def convert_module_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, *, fused: bool, overwrite: bool = False
) -> Path:
    """Write a copy of module checkpoint ``src`` at ``dst`` with every MoE layer fused
    (``wi [G,K,2,N]``) or unfused (``wi_0``, ``wi_1``), bit-exact; the saved configs'
    ``fused_moe_mlp`` follows. Atomic; ``src`` is left as it is."""
    src, dst = Path(src).absolute(), Path(dst).absolute()
    if src == dst:
        raise ValueError(f"convert_module_checkpoint: src and dst are the same path {src}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass overwrite=True to replace it")
    tree, meta = load_module_checkpoint(src)
    configs = {k: MoEConfig.from_dict(v).replace(fused_moe_mlp=fused)
               for k, v in meta["configs"].items()}
    tree = fuse_state(tree) if fused else unfuse_state(tree)
    metadata = dict(meta["metadata"])
    if is_model_checkpoint(meta):  # the whole model's config says the layout too
        model = dict(metadata[MODEL_CONFIG_KEY])
        model["moe"] = {**model["moe"], "fused_moe_mlp": fused}
        metadata[MODEL_CONFIG_KEY] = model
    return save_module_checkpoint(dst, tree, configs=configs, metadata=metadata,
                                  overwrite=overwrite)
