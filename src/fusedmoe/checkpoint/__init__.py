"""Checkpoints: parameter layouts, converters between them, orbax save/restore."""

from fusedmoe.checkpoint.fusion import fuse_state, unfuse_state

__all__ = ["fuse_state", "unfuse_state"]
