"""Where the layer's tokens and weights live: one device, or a ``jax.sharding.Mesh``.

Mesh axes (names from :class:`~fusedmoe.config.MoEConfig`: ``data_axis``,
``expert_axis``, ``tensor_axis``; an axis of size 1 or one missing from the
mesh means no parallelism of that kind):

- tokens are split over ``data`` *and* ``expert`` (so no device idles);
- routed experts are split over ``expert``;
- the expert mlp dim ``N`` is split over ``tensor`` (tokens are replicated there).

A :class:`Placement` is what the layer's one pipeline (:mod:`fusedmoe.pipeline`)
needs to know of it: the axes and their sizes inside the per-device program,
and how to run that program (directly on one device; under ``jax.shard_map``
on a mesh). Meshes of every axis type work (``Auto``, ``Explicit`` (what
``jax.make_mesh`` makes by default), or a mix), with or without
``jax.set_mesh``: values are placed with ``jax.device_put``, which every axis
type accepts, and everything else happens inside ``shard_map``, where all axes
are manual.

Nothing here is a communication layer of its own: every byte moves through a
JAX collective, and several hosts join the way any JAX program does
(``jax.distributed.initialize``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedmoe.config import MoEConfig


@dataclasses.dataclass(frozen=True)
class Axes:
    """The mesh axes as the per-device program sees them: names (``None`` when
    the mesh has no such axis, or none at all) and sizes (1 then)."""

    batch: tuple[str, ...] = ()  # tokens split over these (data, expert)
    expert: str | None = None
    tensor: str | None = None
    data: str | None = None
    ep: int = 1
    tp: int = 1
    dp: int = 1
    platform: str = "cpu"

    def sum_over_tensor(self, x):
        """``x`` summed over the tensor axis (partial sums of a contraction over N)."""
        return jax.lax.psum(x, self.tensor) if self.tp > 1 else x

    def sum_over_batch(self, x):
        """``x`` summed over every device that holds other tokens."""
        return jax.lax.psum(x, self.batch) if self.batch else x

    @property
    def batch_devices(self) -> int:
        return self.dp * self.ep


SINGLE = Axes()


def axis_size(mesh: Mesh, name: str) -> int:
    """Size of mesh axis ``name``; 1 when the mesh has no such axis."""
    return int(mesh.shape[name]) if name in mesh.shape else 1


def sizes(config: MoEConfig, mesh: Mesh) -> tuple[int, int, int]:
    """``(data, expert, tensor)`` sizes of ``mesh`` under ``config``'s axis names."""
    return (axis_size(mesh, config.data_axis), axis_size(mesh, config.expert_axis),
            axis_size(mesh, config.tensor_axis))


def _platform(mesh: Mesh) -> str:
    platform = mesh.devices.flat[0].platform
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def validate_mesh(config: MoEConfig, mesh: Any) -> None:
    """Raise a ``ValueError`` naming the problem when ``mesh`` cannot run ``config``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    known = (config.data_axis, config.expert_axis, config.tensor_axis)
    unknown = [a for a in mesh.axis_names if a not in known]
    if unknown:
        raise ValueError(
            f"mesh: unknown axis name(s) {unknown} (mesh axes {dict(mesh.shape)}); the layer "
            f"uses data_axis={config.data_axis!r}, expert_axis={config.expert_axis!r}, "
            f"tensor_axis={config.tensor_axis!r}. Rename the mesh axes or set these fields"
        )
    _, ep, tp = sizes(config, mesh)
    if config.num_experts % ep:
        raise ValueError(
            f"mesh: num_experts={config.num_experts} is not divisible by the expert axis "
            f"{config.expert_axis!r} of size {ep}; choose an expert axis size that divides it"
        )
    if config.mlp_dim % tp:
        raise ValueError(
            f"mesh: mlp_dim={config.mlp_dim} is not divisible by the tensor axis "
            f"{config.tensor_axis!r} of size {tp}; choose a tensor axis size that divides it"
        )
    if config.shared_mlp_dim % tp:
        raise ValueError(
            f"mesh: shared expert mlp dim {config.shared_mlp_dim} is not divisible by the "
            f"tensor axis {config.tensor_axis!r} of size {tp}"
        )
    if config.expert_all_to_all == "ragged" and ep > 1 and _platform(mesh) == "cpu":
        raise ValueError(
            "expert_all_to_all='ragged': jax.lax.ragged_all_to_all is not implemented on "
            "XLA:CPU; use 'buckets' or 'auto' on CPU devices"
        )


class Placement:
    """One device (``mesh=None``) or a mesh, for one config (checked beforehand
    with :func:`validate_mesh`, as :class:`fusedmoe.MoE` does when it is built)."""

    def __init__(self, config: MoEConfig, mesh: Mesh | None = None):
        self.config, self.mesh = config, mesh

    @property
    def axes(self) -> Axes:
        if self.mesh is None:
            return SINGLE
        c, mesh = self.config, self.mesh
        present = lambda name: name if name in mesh.shape else None  # noqa: E731
        dp, ep, tp = sizes(c, mesh)
        return Axes(batch=tuple(a for a in (c.data_axis, c.expert_axis) if a in mesh.shape),
                    expert=present(c.expert_axis), tensor=present(c.tensor_axis),
                    data=present(c.data_axis), ep=ep, tp=tp, dp=dp, platform=_platform(mesh))

    def token_spec(self) -> P:
        """Tokens ``[T, ...]``: rows over ``data`` and ``expert`` (those the mesh has)."""
        return P(self.axes.batch or None)

    def param_specs(self) -> dict[str, P]:
        """PartitionSpec of every parameter the layer may own, by attribute path."""
        axes = self.axes
        ex, tp = axes.expert, axes.tensor
        return {
            "gate.kernel": P(), "gate.bias": P(), "selection_bias": P(),
            "wi": P(ex, None, None, tp), "wi_0": P(ex, None, tp), "wi_1": P(ex, None, tp),
            "wo": P(ex, tp, None),
            "wi_bias": P(ex, None, tp), "wi_0_bias": P(ex, tp), "wi_1_bias": P(ex, tp),
            "wo_bias": P(ex, None),
            "shared_wi": P(None, None, tp), "shared_wi_0": P(None, tp),
            "shared_wi_1": P(None, tp), "shared_wo": P(tp, None), "shared_gate.kernel": P(),
        }

    def replicated(self, x: jax.Array) -> jax.Array:
        """``x`` on every device of the mesh (as it is on one device)."""
        return x if self.mesh is None else put(x, NamedSharding(self.mesh, P()))

    def run(self, body: Callable, args: tuple, in_specs: tuple, out_specs) -> Any:
        """``body(*args)`` on one device; on a mesh, ``body`` is each device's
        program under ``jax.shard_map`` and ``args`` are placed per ``in_specs``
        first (a no-op for arrays already placed so)."""
        if self.mesh is None:
            return body(*args)
        args = jax.tree.map(
            lambda spec, a: None if spec is None else put(a, NamedSharding(self.mesh, spec)),
            in_specs, args, is_leaf=lambda s: s is None or isinstance(s, P))
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
            # megablox (jax's Pallas kernel) declares no varying manual axes on its
            # outputs, so the check would refuse it; unchecked, shard_map's transpose
            # still sums the cotangents of inputs replicated over an axis (tokens over
            # tensor), which the gradient tests check. (tiled, ragged_dot, cpu_kernel
            # and tokamax also run in a user's checked shard_map: tests/test_parallel.py.)
            check_vma=False,
        )(*args)


def put(value: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``value`` (the same on every process) placed with ``sharding``, which may span
    devices of other processes and have axes of any type. Inside ``jit``:
    ``with_sharding_constraint`` on a mesh of ``Auto`` axes (which it alone
    constrains), ``jax.sharding.reshard`` to the ``Explicit`` axes of a mesh
    that has some (types carry those; ``with_sharding_constraint`` refuses
    them, and ``device_put``'s transpose mistypes mixed meshes)."""
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        mesh = sharding.mesh
        explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
        if not explicit:
            return jax.lax.with_sharding_constraint(value, sharding)
        # Types carry the Explicit axes' shardings: reshard to those (the Auto
        # ones of a mixed mesh are the compiler's to place).
        return jax.sharding.reshard(value, NamedSharding(mesh, _only(sharding.spec, explicit)))
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _only(spec: P, axes: set[str]) -> P:
    """``spec`` naming only ``axes`` (the others dropped)."""
    def keep(entry):
        names = entry if isinstance(entry, tuple) else (entry,)
        kept = tuple(a for a in names if a in axes)
        return kept if len(kept) > 1 else (kept[0] if kept else None)
    return P(*(keep(e) if e is not None else None for e in spec))


def shard_module(module, placement: Placement) -> None:
    """Place every parameter of the :class:`fusedmoe.MoE` ``module`` per
    :meth:`Placement.param_specs` (in place)."""
    for path, spec in placement.param_specs().items():
        owner = module
        *parents, leaf = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        var = getattr(owner, leaf, None) if owner is not None else None
        if var is None:
            continue
        var.set_value(put(var.get_value(), NamedSharding(placement.mesh, spec)))
