"""Checkpoints: parameter layouts, converters between them, orbax save/restore.

Hugging Face import/export lives in :mod:`fusedmoe.hf`; the ``fusedmoe convert``
command in :mod:`fusedmoe.checkpoint.convert_cli`. See docs/checkpoints.md.
"""

from fusedmoe.checkpoint.fusion import fuse_state, unfuse_state
from fusedmoe.checkpoint.layouts import LAYOUTS, Layout, convert, from_unfused, to_unfused
from fusedmoe.checkpoint.orbax_io import (
    convert_checkpoint,
    load_checkpoint,
    load_moe,
    restore_module,
    save_checkpoint,
)
from fusedmoe.checkpoint.state import module_from_state, update_module

__all__ = [
    "LAYOUTS",
    "Layout",
    "convert",
    "convert_checkpoint",
    "from_unfused",
    "fuse_state",
    "load_checkpoint",
    "load_moe",
    "module_from_state",
    "restore_module",
    "save_checkpoint",
    "to_unfused",
    "unfuse_state",
    "update_module",
]
