"""Checkpoints of training runs: the steps under ``<out>/checkpoints/<step>/``.

Each step is an orbax checkpoint with three items: ``params``, ``opt_state``
(the optax state) and ``meta`` (the step and the whole
:class:`fusedmoe.train.TrainConfig` as a dict, so a run restores without being
told its shape). Orbax writes a step into a temporary directory and renames it
when complete; only *finalized* steps are ever read (see
:func:`finalized_run_steps`), and a resumed run first moves anything else to
``checkpoints.incomplete/`` (:func:`set_aside_incomplete_run_steps`).

This module stores and reads arrays; it knows nothing of the model or the
optimizer. Reading a step back needs the abstract state to restore into, which
the trainer provides: :func:`fusedmoe.train.restore_run` puts the two together.
A run's state converts between the fused and the unfused layout with
:func:`convert_run_state` (the parameters and the optimizer's
parameter-shaped trees, Adam's mu and nu).

(:mod:`fusedmoe.checkpoint.module_checkpoint` is the other checkpoint format: a
single module's state with its MoE configs, not a training run.)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fusedmoe.checkpoint.fusion import fuse_state, unfuse_state

if TYPE_CHECKING:
    from fusedmoe.train.config import TrainConfig

CHECKPOINT_DIR = "checkpoints"
INCOMPLETE_DIR = "checkpoints.incomplete"
META_VERSION = 1
ITEMS = ("params", "opt_state", "meta")


def _map_param_trees(opt_state: Any, fn: Callable[[Mapping], Any]) -> Any:
    """Apply ``fn`` to every parameter-shaped tree inside an optax state: every
    mapping (optax keeps ``mu``/``nu`` as trees shaped like the params) reached
    through tuples and named tuples; other leaves are kept."""
    if isinstance(opt_state, Mapping):
        return fn(opt_state)
    if isinstance(opt_state, tuple):
        items = [_map_param_trees(x, fn) for x in opt_state]
        return type(opt_state)(*items) if hasattr(opt_state, "_fields") else tuple(items)
    if isinstance(opt_state, list):
        return [_map_param_trees(x, fn) for x in opt_state]
    return opt_state


def convert_run_state(state: Mapping[str, Any], fused: bool) -> dict[str, Any]:
    """A run's state (``params``, and ``opt_state`` when present) in the fused or
    unfused layout: :func:`fusedmoe.checkpoint.fusion.fuse_state` / ``unfuse_state``
    on the parameters and on the optimizer's parameter-shaped trees (Adam's mu, nu)."""
    fn = fuse_state if fused else unfuse_state
    converted = {"params": fn(state["params"])}
    if "opt_state" in state:
        converted["opt_state"] = _map_param_trees(state["opt_state"], fn)
    return converted


def run_checkpoint_manager(out: str, keep: int | None):
    """The orbax ``CheckpointManager`` of ``out/checkpoints`` (items ``params``,
    ``opt_state``, ``meta``; the last ``keep`` steps are kept, all for ``None``)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(out, CHECKPOINT_DIR)),
        item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def _is_finalized(step_dir: str) -> bool:
    # Orbax writes a step into "<step>.orbax-checkpoint-tmp-*" and renames it when
    # complete, and its step listing skips those. A bare "<step>" directory that a
    # crash (or a copy, or a non-atomic filesystem) left behind is listed though;
    # only the commit timestamp orbax records at finalization proves completeness.
    try:
        with open(os.path.join(step_dir, "_CHECKPOINT_METADATA")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return bool(meta.get("commit_timestamp_nsecs")) and all(
        os.path.isdir(os.path.join(step_dir, item)) for item in ITEMS
    )


def finalized_run_steps(out: str) -> list[int]:
    """Steps in ``out/checkpoints`` that were completely written, ascending."""
    root = os.path.join(out, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.isdigit() and _is_finalized(os.path.join(root, name)):
            steps.append(int(name))
    return sorted(steps)


def set_aside_incomplete_run_steps(out: str) -> list[str]:
    """Move the step directories of ``out/checkpoints`` that are not finalized out
    of orbax's way, into ``out/checkpoints.incomplete/``; returns their names."""
    root = os.path.join(out, CHECKPOINT_DIR)
    moved = []
    if not os.path.isdir(root):
        return moved
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path) and not (name.isdigit() and _is_finalized(path)):
            dest = os.path.join(out, INCOMPLETE_DIR, f"{name}.{time.time_ns()}")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(path, dest)
            moved.append(name)
    return moved


def read_run_meta(out: str, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` item (``version``, ``step``, ``config`` as a dict) of the latest
    (or given) finalized step of run ``out``."""
    steps = finalized_run_steps(out)
    if not steps:
        raise FileNotFoundError(f"{out}: no finalized checkpoint in {CHECKPOINT_DIR}/")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{out}: no finalized checkpoint for step {step}; have {steps}")
    path = os.path.join(out, CHECKPOINT_DIR, str(step), "meta", "metadata")
    with open(path) as f:
        return json.load(f)


def load_run_step(out: str, step: int, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """The items named in ``abstract`` (``params``, and ``opt_state`` if asked for)
    of finalized step ``step`` of run ``out``, restored into the trees of abstract
    arrays given there (``jax.ShapeDtypeStruct`` leaves)."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    unknown = sorted(set(abstract) - {"params", "opt_state"})
    if unknown:
        raise ValueError(f"abstract: unknown item(s) {unknown}, expected params and opt_state")
    mngr = run_checkpoint_manager(out, keep=None)  # read only: nothing is deleted
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
    finally:
        mngr.close()
    state = {name: restored[name] for name in abstract}
    # Orbax returns arrays committed to a device, jitted functions return
    # uncommitted ones; the compiled step is keyed on that, so match a fresh run.
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)


def save_run_step(out: str, state: Mapping[str, Any], config: TrainConfig, step: int,
                  mngr=None) -> None:
    """Write ``state`` (``params``, ``opt_state``) and ``config`` as step ``step`` of
    run ``out`` (atomically: orbax writes a temporary directory and renames it).
    ``mngr``: a :func:`run_checkpoint_manager` of ``out`` to reuse (a loop saving
    many steps); without it one is opened, waited for and closed here."""
    import orbax.checkpoint as ocp

    own = mngr is None
    mngr = run_checkpoint_manager(out, config.keep_checkpoints) if own else mngr
    meta = {"version": META_VERSION, "step": step, "config": config.to_dict()}
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        meta=ocp.args.JsonSave(meta),
    ), force=True)
    if own:
        mngr.wait_until_finished()
        mngr.close()
