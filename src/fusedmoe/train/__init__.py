"""Train the small MoE language model of :mod:`fusedmoe.model`, or fine-tune a
Hugging Face model (``fusedmoe train``).

Next-token prediction on the text the package ships in ``fusedmoe/data/*.txt``
(no download) read byte by byte (vocab 256), or through a Hugging Face model's
``tokenizer.json``, or on token ids from a file; AdamW with linear warm-up and
cosine decay, global-norm gradient clipping, the MoE load-balance loss added
to the cross-entropy. ``TrainConfig.init`` starts from a Hugging Face model's
weights; :func:`export_hf` writes tuned parameters back in its format.

Python API::

    from fusedmoe.train import TrainConfig, train
    result = train(TrainConfig.preset("tiny"), out="runs/tiny")
    result.losses          # one float per step run

    # fine-tuning: the model of a Hugging Face directory, on its tokenizer
    from fusedmoe.train.pretrained import init_model_config
    config = TrainConfig.preset("tiny").replace(
        model=init_model_config("path/to/model", fused=True), init="path/to/model",
        tokenizer="path/to/model/tokenizer.json", learning_rate=1e-5)
    result = train(config, out="runs/ft")
    export_hf(result.state["params"], config.model, "out/", tokenizer_from="path/to/model")

Everything that makes a run reproducible is a pure function of the config: the
batch of step ``s`` is drawn from ``numpy.random.default_rng([seed, s])`` (see
:mod:`fusedmoe.corpus`), the parameters from ``seed``, so a run resumed from its
step-``s`` checkpoint takes the same steps as one that was never stopped
(bitwise, on CPU).

Written to ``--out DIR``:

- ``checkpoints/<step>/``: orbax checkpoints (``params``, ``opt_state``,
  ``meta``), written to a temporary directory and renamed when complete; the
  last ``keep_checkpoints`` are kept. Only finalized checkpoints are ever
  restored (see :mod:`fusedmoe.checkpoint.run_checkpoint`).
- ``metrics.jsonl``: one JSON object per step (:mod:`fusedmoe.train.metrics`).
- ``loss_curve.png``: the loss curve (when matplotlib is installed).

One concern per module, each importing only the ones above it:

- ``config``: :class:`TrainConfig`, its validation, ``PRESETS``;
- ``data``: the token stream (bytes, a tokenizer's ids, or ids from a file);
- ``pretrained``: a Hugging Face model's config and weights in, tuned weights out;
- ``trainer``: schedule, optimizer, :class:`Trainer` (the jitted step), ``trainer_for``;
- ``metrics``: ``metrics.jsonl``; ``plot``: the loss-curve PNG; ``progress``: the
  progress bar and the closing summary;
- ``resume``: a run directory read back (``restore_run``, ``convert_run``);
- ``loop``: :func:`train` and :class:`TrainResult`;
- ``command``: the ``fusedmoe train`` command line.

The names below are imported the first time they are used, so that importing
``fusedmoe.train.command`` (as ``fusedmoe --help`` does) does not import jax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusedmoe._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "TrainConfig": "fusedmoe.train.config",
    "PRESETS": "fusedmoe.train.config",
    "DEFAULT_PRESET": "fusedmoe.train.config",
    "Trainer": "fusedmoe.train.trainer",
    "trainer_for": "fusedmoe.train.trainer",
    "make_schedule": "fusedmoe.train.trainer",
    "make_optimizer": "fusedmoe.train.trainer",
    "learning_rates": "fusedmoe.train.trainer",
    "METRICS_FILE": "fusedmoe.train.metrics",
    "read_metrics": "fusedmoe.train.metrics",
    "write_metrics": "fusedmoe.train.metrics",
    "LOSS_PNG": "fusedmoe.train.plot",
    "plot_losses": "fusedmoe.train.plot",
    "restore_run": "fusedmoe.train.resume",
    "convert_run": "fusedmoe.train.resume",
    "train": "fusedmoe.train.loop",
    "TrainResult": "fusedmoe.train.loop",
    "export_hf": "fusedmoe.train.pretrained",
    "init_model_config": "fusedmoe.train.pretrained",
}

__all__ = [  # noqa: RUF022 - the order of _EXPORTS
    "TrainConfig", "PRESETS", "DEFAULT_PRESET", "Trainer", "trainer_for", "make_schedule",
    "make_optimizer", "learning_rates", "METRICS_FILE", "read_metrics", "write_metrics",
    "LOSS_PNG", "plot_losses", "restore_run", "convert_run", "train", "TrainResult",
    "export_hf", "init_model_config",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from fusedmoe.train.config import DEFAULT_PRESET, PRESETS, TrainConfig
    from fusedmoe.train.loop import TrainResult, train
    from fusedmoe.train.metrics import METRICS_FILE, read_metrics, write_metrics
    from fusedmoe.train.plot import LOSS_PNG, plot_losses
    from fusedmoe.train.pretrained import export_hf, init_model_config
    from fusedmoe.train.resume import convert_run, restore_run
    from fusedmoe.train.trainer import (
        Trainer,
        learning_rates,
        make_optimizer,
        make_schedule,
        trainer_for,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
