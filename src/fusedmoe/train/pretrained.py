"""Fine-tuning a Hugging Face model: the run's model config read from a model
directory (:func:`init_model_config`), its starting parameters loaded from it
(:func:`init_params`), and the tuned parameters written back as a Hugging Face
model (:func:`export_hf`).

A run that starts from a model records the directory in ``TrainConfig.init``
(its checkpoints then hold the tuned parameters, so resuming needs the
directory no more). The parameters train in float32 whatever the checkpoint's
dtype, so the export is float32 too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fusedmoe.model import ModelConfig
    from fusedmoe.train.config import TrainConfig

TRAIN_DTYPE = "float32"
TOKENIZER_FILE = "tokenizer.json"
# Copied beside an export when the source model has them: a complete model directory.
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def init_model_config(path: str | os.PathLike, *, fused: bool, backend: str = "auto"
                      ) -> ModelConfig:
    """The :class:`~fusedmoe.model.ModelConfig` of the Hugging Face model at ``path``
    as a run trains it (float32, ``fused``, ``backend``). Reads ``config.json`` and
    the shards' headers, no tensor data; raises ``CheckpointError`` naming the file."""
    from fusedmoe import hf

    path = Path(path)
    hf_config = hf.read_hf_config(path)
    config = hf.model_config(hf_config, fused_moe_mlp=fused, dtype=TRAIN_DTYPE,
                             where=str(path / "config.json"), gmm_backend=backend)
    hf.SafetensorsDir(path)  # the shards exist, are whole, and the index agrees
    return config


def init_params(config: TrainConfig) -> dict[str, Any]:
    """The parameters (a pure dict shaped as the trainer's) of ``config.init``,
    loaded in ``config.model``'s layout and dtype."""
    from flax import nnx

    from fusedmoe import hf

    moe = config.model.moe
    model = hf.load_model(config.init, fused_moe_mlp=moe.fused_moe_mlp, dtype=TRAIN_DTYPE,
                          gmm_backend=moe.gmm_backend, max_seq_len=config.model.max_seq_len)
    if model.config != config.model:
        raise ValueError(f"init: the model in {config.init} is not the model of the run's "
                         "config (config.json changed since the run was configured?)")
    return nnx.state(model, nnx.Param).to_pure_dict()


def model_with(params: dict[str, Any], config: ModelConfig):
    """A :class:`~fusedmoe.model.Decoder` of ``config`` holding ``params`` (built
    abstractly: nothing is initialised)."""
    from flax import nnx

    from fusedmoe.model import Decoder

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def check_exportable(config: ModelConfig) -> None:
    """A ``CheckpointError`` unless a model of ``config`` can be written in the Hugging
    Face format (a model of a Hugging Face family, as ``--init`` gives)."""
    from fusedmoe.hf.model import check_model_exportable

    check_model_exportable(config)


def export_hf(params: dict[str, Any], config: ModelConfig, path: str | os.PathLike, *,
              tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write ``params`` (a run's parameters, fused or unfused as ``config`` says) as a
    Hugging Face model directory at ``path`` (:func:`fusedmoe.hf.save_model`), with
    the tokenizer files of ``tokenizer_from`` (the model the run started from) that
    exist. Atomic: ``path`` appears complete or not at all."""
    from fusedmoe import hf
    from fusedmoe.atomic import atomic_directory

    model = model_with(params, config)
    with atomic_directory(path) as tmp:
        hf.save_model(model, tmp, overwrite=True)  # replaces the empty tmp, atomically
        if tokenizer_from:
            for name in TOKENIZER_FILES:
                source = Path(tokenizer_from) / name
                if source.is_file():
                    shutil.copyfile(source, tmp / name)
    return Path(path).absolute()
