"""Checkpoints: parameter layouts, converters between them, and two on-disk formats.

- :mod:`~fusedmoe.checkpoint.module_checkpoint`: one module's state and its MoE
  configs (``path/state/`` + ``fusedmoe.json``): ``save_module_checkpoint``,
  ``load_module_checkpoint``, ``restore_module_checkpoint``,
  ``moe_from_module_checkpoint``, ``convert_module_checkpoint``.
- :mod:`~fusedmoe.checkpoint.run_checkpoint`: the steps of a training run
  (``<out>/checkpoints/<step>/``, with the optimizer's state): ``save_run_step``,
  ``load_run_step``, ``finalized_run_steps``, ``convert_run_state``; restoring and
  converting a whole run is :func:`fusedmoe.train.restore_run` / ``convert_run``.

Hugging Face import/export lives in :mod:`fusedmoe.hf`; the ``fusedmoe convert``
command in :mod:`fusedmoe.checkpoint.convert_cli`. See docs/checkpoints.md.

The names below are imported the first time they are used, so that the command
line's ``--help`` (which imports ``convert_cli``) does not wait for jax.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fusedmoe._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "LAYOUTS": "fusedmoe.checkpoint.layouts",
    "Layout": "fusedmoe.checkpoint.layouts",
    "convert": "fusedmoe.checkpoint.layouts",
    "from_unfused": "fusedmoe.checkpoint.layouts",
    "to_unfused": "fusedmoe.checkpoint.layouts",
    "fuse_state": "fusedmoe.checkpoint.fusion",
    "unfuse_state": "fusedmoe.checkpoint.fusion",
    "module_from_state": "fusedmoe.checkpoint.state",
    "update_module": "fusedmoe.checkpoint.state",
    "save_module_checkpoint": "fusedmoe.checkpoint.module_checkpoint",
    "load_module_checkpoint": "fusedmoe.checkpoint.module_checkpoint",
    "restore_module_checkpoint": "fusedmoe.checkpoint.module_checkpoint",
    "moe_from_module_checkpoint": "fusedmoe.checkpoint.module_checkpoint",
    "convert_module_checkpoint": "fusedmoe.checkpoint.module_checkpoint",
    "save_run_step": "fusedmoe.checkpoint.run_checkpoint",
    "load_run_step": "fusedmoe.checkpoint.run_checkpoint",
    "finalized_run_steps": "fusedmoe.checkpoint.run_checkpoint",
    "convert_run_state": "fusedmoe.checkpoint.run_checkpoint",
}

__all__ = [  # noqa: RUF022 - the order of _EXPORTS
    "LAYOUTS", "Layout", "convert", "from_unfused", "to_unfused", "fuse_state", "unfuse_state",
    "module_from_state", "update_module", "save_module_checkpoint", "load_module_checkpoint",
    "restore_module_checkpoint", "moe_from_module_checkpoint", "convert_module_checkpoint",
    "save_run_step", "load_run_step", "finalized_run_steps", "convert_run_state",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from fusedmoe.checkpoint.fusion import fuse_state, unfuse_state
    from fusedmoe.checkpoint.layouts import LAYOUTS, Layout, convert, from_unfused, to_unfused
    from fusedmoe.checkpoint.module_checkpoint import (
        convert_module_checkpoint,
        load_module_checkpoint,
        moe_from_module_checkpoint,
        restore_module_checkpoint,
        save_module_checkpoint,
    )
    from fusedmoe.checkpoint.run_checkpoint import (
        convert_run_state,
        finalized_run_steps,
        load_run_step,
        save_run_step,
    )
    from fusedmoe.checkpoint.state import module_from_state, update_module


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
