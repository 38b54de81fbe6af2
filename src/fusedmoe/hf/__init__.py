"""Hugging Face checkpoints in and out: whole models and single MoE layers.

=====================  ======================================================
module                 what it holds
=====================  ======================================================
``families``           each model type as data: tensor names, decoder options
``config``             ``config.json`` <-> :class:`ModelConfig` / :class:`MoEConfig`
``safetensors_io``     shard headers checked, tensors read one by one, shards written
``fill``               each parameter's final array filled in place, tensor by tensor
``layers``             one MoE layer in and out (``load_moe_layer``, ``export_moe_layer``)
``model``              whole models: :func:`load_model`, :func:`save_model`
=====================  ======================================================

``model = hf.load_model(path)`` gives a :class:`fusedmoe.model.Decoder`;
``hf.save_model(model, out)`` writes a directory transformers'
``from_pretrained`` loads. No torch or transformers is needed for either.
"""

from fusedmoe.errors import CheckpointError
from fusedmoe.hf.config import (
    check_layer,
    hf_config_for,
    model_config,
    model_hf_config,
    moe_config,
    moe_layer_indices,
    num_layers,
    read_hf_config,
)
from fusedmoe.hf.families import (
    FAMILIES,
    SUPPORTED_MODEL_TYPES,
    WHOLE_MODEL_TYPES,
    Family,
    family_of,
)
from fusedmoe.hf.layers import (
    check_exportable,
    check_layer_tensors,
    expected_tensors,
    export_moe_layer,
    hf_to_state,
    load_moe_layer,
    load_moe_layers,
    read_layer_tensors,
    save_safetensors,
    state_to_hf,
)
from fusedmoe.hf.model import load_model, save_model
from fusedmoe.hf.safetensors_io import SafetensorsDir

__all__ = [
    "FAMILIES", "SUPPORTED_MODEL_TYPES", "WHOLE_MODEL_TYPES", "CheckpointError", "Family",
    "SafetensorsDir", "check_exportable", "check_layer", "check_layer_tensors",
    "expected_tensors", "export_moe_layer", "family_of", "hf_config_for", "hf_to_state",
    "load_model", "load_moe_layer", "load_moe_layers", "model_config", "model_hf_config",
    "moe_config", "moe_layer_indices", "num_layers", "read_hf_config", "read_layer_tensors",
    "save_model", "save_safetensors", "state_to_hf",
]
