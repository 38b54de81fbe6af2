"""Checkpoints of training runs: ``<out>/checkpoints/<step>/`` of ``fusedmoe train``.

Each step is an orbax checkpoint with three items: ``params``, ``opt_state``
(the optax state) and ``meta`` (the step and the whole
:class:`fusedmoe.train.TrainConfig`, so a checkpoint restores without being told
its shape). Orbax writes a step into a temporary directory and renames it when
complete; only *finalized* steps are ever restored (see :func:`finalized_steps`),
and a resumed run first moves anything else to ``checkpoints.incomplete/``
(:func:`set_aside_incomplete`).

A run's state converts between the fused and the unfused layout
(:func:`convert_state`): the parameters and the optimizer's parameter-shaped
trees (Adam's mu, nu). :func:`convert_checkpoint` writes a converted copy of a
run that ``train(..., resume=True)`` continues.

(:mod:`fusedmoe.checkpoint.orbax_io` is the other checkpoint format: a single
module's state with its MoE configs, not a training run.)
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
    from fusedmoe.train import TrainConfig

CHECKPOINT_DIR = "checkpoints"
INCOMPLETE_DIR = "checkpoints.incomplete"
META_VERSION = 1


def map_param_trees(opt_state: Any, fn: Callable[[Mapping], Any]) -> Any:
    """Apply ``fn`` to every parameter-shaped tree inside an optax state: every
    mapping (optax keeps ``mu``/``nu`` as trees shaped like the params) reached
    through tuples and named tuples; other leaves are kept."""
    if isinstance(opt_state, Mapping):
        return fn(opt_state)
    if isinstance(opt_state, tuple):
        items = [map_param_trees(x, fn) for x in opt_state]
        return type(opt_state)(*items) if hasattr(opt_state, "_fields") else tuple(items)
    if isinstance(opt_state, list):
        return [map_param_trees(x, fn) for x in opt_state]
    return opt_state


def convert_state(state: Mapping[str, Any], fused: bool) -> dict[str, Any]:
    """A train state (``params`` and ``opt_state``) in the fused or unfused layout:
    :func:`fusedmoe.checkpoint.fusion.fuse_state` / ``unfuse_state`` on the
    parameters and on the optimizer's parameter-shaped trees (Adam's mu, nu)."""
    fn = fuse_state if fused else unfuse_state
    return {"params": fn(state["params"]),
            "opt_state": map_param_trees(state["opt_state"], fn)}


def checkpoint_manager(out: str, keep: int):
    """The orbax ``CheckpointManager`` of ``out/checkpoints`` (items ``params``,
    ``opt_state``, ``meta``; the last ``keep`` steps are kept)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(out, CHECKPOINT_DIR)),
        item_names=("params", "opt_state", "meta"),
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
        os.path.isdir(os.path.join(step_dir, item)) for item in ("params", "opt_state", "meta")
    )


def finalized_steps(out: str) -> list[int]:
    """Steps in ``out/checkpoints`` that were completely written, ascending."""
    root = os.path.join(out, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.isdigit() and _is_finalized(os.path.join(root, name)):
            steps.append(int(name))
    return sorted(steps)


def set_aside_incomplete(out: str) -> list[str]:
    """Move step directories that are not finalized out of orbax's way."""
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


def read_meta(out: str, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` item (step, config) of the latest (or given) finalized checkpoint."""
    steps = finalized_steps(out)
    if not steps:
        raise FileNotFoundError(f"{out}: no finalized checkpoint in {CHECKPOINT_DIR}/")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{out}: no finalized checkpoint for step {step}; have {steps}")
    path = os.path.join(out, CHECKPOINT_DIR, str(step), "meta", "metadata")
    with open(path) as f:
        return json.load(f)


def restore(out: str, step: int | None = None, *, params_only: bool = False,
            fused: bool | None = None) -> tuple[dict[str, Any], TrainConfig, int]:
    """Restore ``(state, config, step)`` from the latest (or given) finalized
    checkpoint in ``out``. ``fused`` converts the state to that layout (and the
    returned config says so); ``None`` keeps the checkpoint's."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from fusedmoe.train import TrainConfig, get_trainer

    meta = read_meta(out, step)
    step = int(meta["step"])
    config = TrainConfig.from_dict(meta["config"])
    trainer_abstract = get_trainer(config).abstract_state()
    targets = {"params": ocp.args.StandardRestore(trainer_abstract["params"])}
    if not params_only:
        targets["opt_state"] = ocp.args.StandardRestore(trainer_abstract["opt_state"])
    mngr = checkpoint_manager(out, config.keep_checkpoints)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(**targets))
    finally:
        mngr.close()
    state = {"params": restored["params"]}
    if not params_only:
        state["opt_state"] = restored["opt_state"]
    # Orbax returns arrays committed to a device, jitted functions return
    # uncommitted ones; the compiled step is keyed on that, so match a fresh run.
    state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
    if fused is not None and fused != config.fused:
        if params_only:
            state = {"params": (fuse_state if fused else unfuse_state)(state["params"])}
        else:
            state = convert_state(state, fused)
        config = config.with_layout(fused=fused)
    return state, config, step


def save_checkpoint(out: str, state: Mapping[str, Any], config: TrainConfig, step: int,
                    mngr=None) -> None:
    """Write ``state`` as checkpoint ``step`` of ``out`` (atomically: orbax writes a
    temporary directory and renames it)."""
    import orbax.checkpoint as ocp

    own = mngr is None
    mngr = checkpoint_manager(out, config.keep_checkpoints) if own else mngr
    meta = {"version": META_VERSION, "step": step, "config": config.to_dict()}
    mngr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        meta=ocp.args.JsonSave(meta),
    ), force=True)
    if own:
        mngr.wait_until_finished()
        mngr.close()


def convert_checkpoint(src: str, dst: str, fused: bool, step: int | None = None) -> int:
    """Write the latest (or given) checkpoint of run ``src`` into run directory
    ``dst`` in the fused or unfused layout (with ``src``'s metrics up to that
    step), so ``train(..., out=dst, resume=True)`` continues it. Returns the step."""
    from fusedmoe.train import read_metrics, write_metrics

    if os.path.exists(os.path.join(dst, CHECKPOINT_DIR)):
        raise FileExistsError(f"{dst}: already holds checkpoints")
    state, config, step = restore(src, step, fused=fused)
    os.makedirs(dst, exist_ok=True)
    save_checkpoint(dst, state, config, step)
    rows = [r for r in read_metrics(src) if r["step"] <= step]
    write_metrics(dst, rows)
    return step

