"""Multi-device checks of the layer on meshes of 8 forced CPU devices.

Run by tests/test_parallel.py in its own process (the main pytest process has
one device). Prints one JSON object on the last line:
``{"cases": {name: {"errors": {part: max abs diff}, ...}}, "bad_meshes": {...}}``.

    python tests/multidevice/check_parallel.py
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

from fusedmoe import MoE, exchange  # noqa: E402
from fusedmoe.placement import put  # noqa: E402


def compare(cases, name, cfg, shape, ref, *, mesh=None, run_as=None, context=False,
            input_spec=None):
    """The layer of ``cfg`` on ``mesh`` (default: an Auto ``Mesh`` of ``shape``)
    against ``ref``; ``run_as``: a config the built layer runs with instead
    (past the construction's checks); ``context``: called inside ``jax.set_mesh``;
    ``input_spec``: the input placed on the mesh so (else as it comes)."""
    mesh = common.make_mesh(shape) if mesh is None else mesh
    model = common.layer(cfg, mesh)
    if run_as is not None:
        model.config = run_as
    inputs = common.inputs()
    if input_spec is not None:
        inputs = [put(a, NamedSharding(mesh, input_spec)) for a in inputs]
    if context:
        with jax.set_mesh(mesh):
            got = common.step(model, *inputs, mesh=mesh)
    else:
        got = common.step(model, *inputs, mesh=mesh)
    cases[name] = {"errors": common.max_errors(ref, got),
                   "dropped_rows": int(got[1].get("dropped_rows", 0))}
    return model


def global_concat_case(cases, fused_cfg):
    """What a *global* ``[gate | up]`` layout ``[G, K, 2N]`` does under tensor
    parallelism: sharding its last dim gives shard t the columns
    ``[t*2N/tp, (t+1)*2N/tp)``, which each shard splits into its own gate and up
    halves. Emulate that by handing the layer the equivalent per-shard weight."""
    ref, _ = common.layer(fused_cfg)(common.inputs()[0])
    shape = (2, 2, 2)
    mesh = common.make_mesh(shape)
    model = common.layer(fused_cfg, mesh)
    tp = shape[2]
    wi = np.asarray(model.wi.get_value())
    g, k, _, n = wi.shape
    shard_view = (wi.reshape(g, k, 2 * n).reshape(g, k, tp, 2, n // tp)
                  .transpose(0, 1, 3, 2, 4).reshape(g, k, 2, n))
    model.wi.set_value(put(jnp.asarray(shard_view), model.wi.get_value().sharding))
    out, _ = forward(model, mesh)
    cases[f"global_concat_layout_{shape}"] = {
        "errors": {"out": common._err(ref, out)}, "expect_wrong": True}


def user_shard_map_case(cases, fused: bool, backend: str) -> None:
    """The layer (no mesh of its own, grouped matmul ``backend``) inside a
    user's data-parallel ``jax.shard_map``, which checks varying manual axes by
    default: its gradients equal one device's. Aux losses are per device there,
    so the loss is ``sum(out * r)`` alone."""
    from jax.sharding import PartitionSpec as P

    cfg = common.config(fused_moe_mlp=fused, gmm_backend=backend)
    graphdef, state = nnx.split(common.layer(cfg))
    x, r = common.inputs()

    def grads(state, x, r):
        return jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)[0] * r),
                        argnums=(0, 1))(state, x)

    mesh = Mesh(np.array(jax.devices()[: common.BATCH]), ("data",))  # a batch row each
    sharded = jax.shard_map(grads, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                            out_specs=(P(), P("data")))
    want, got = jax.jit(grads)(state, x, r), jax.jit(sharded)(state, x, r)
    flat_want, flat_got = (dict(nnx.to_flat_state(g[0])) for g in (want, got))
    errors = {"d_x": common._err(want[1], got[1])}
    errors.update({f"d_{'.'.join(map(str, k))}": common._err(flat_want[k], flat_got[k])
                   for k in flat_want})
    cases[f"user_shard_map_{'fused' if fused else 'unfused'}_{backend}"] = {"errors": errors}


def ragged_lowering():
    """The real ``jax.lax.ragged_all_to_all`` path, forward and gradient, lowers
    (XLA:CPU cannot compile it; GPU/TPU run it)."""
    cfg = common.config(fused_moe_mlp=True, gmm_backend="ragged_dot")
    mesh = common.make_mesh((2, 4, 1))
    model = common.layer(cfg, mesh)
    model.config = cfg.replace(expert_all_to_all="ragged")  # past the CPU check
    graphdef, state = nnx.split(model)
    x, r = common.inputs()

    def loss(state, x):
        out, _ = nnx.merge(graphdef, state)(x)
        return jnp.sum(out * r)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).as_text()
    return {"ragged_all_to_all_calls": text.count("ragged_all_to_all")}


def layer_collectives():
    """Collectives of the whole compiled sparse layer (router, routing, aux losses,
    experts) on (2, 4, 1): the token exchange and a few scalar all-reduces, no
    all-gather of tokens or router scores."""
    from fusedmoe.parallel_report import collective_bytes

    cfg = common.config(fused_moe_mlp=True, gmm_backend="ragged_dot", shared_experts=0,
                        score_func="sigmoid", n_routing_groups=4, topk_routing_group=2,
                        routing_selection_bias=True)
    mesh = common.make_mesh((2, 4, 1))
    graphdef, state = nnx.split(common.layer(cfg, mesh))
    x = common.inputs()[0].reshape(8, 4, 16)  # batch over all 8 devices, so the
    # output's [B, S, K] reshape needs no resharding either
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return collective_bytes(fn.lower(state, x).compile().as_text(), 8)


def odd_token_counts(cases):
    """Token counts that do not divide over the data x expert devices (a decode
    step's few tokens): padded inside the layer, the same result as one device."""
    from jax.sharding import AxisType

    kinds = {"auto": None, "explicit": (AxisType.Explicit,) * 3,
             "mixed": (AxisType.Explicit, AxisType.Auto, AxisType.Explicit)}
    plan = [(True, (2, 2, 2), "auto"), (True, (1, 8, 1), "auto"), (False, (2, 2, 2), "auto"),
            (True, (2, 2, 2), "explicit"), (True, (2, 2, 2), "mixed")]
    for sparse, shape, kind in plan:
        cfg = common.config(fused_moe_mlp=sparse, sparse_matmul=sparse, gmm_backend="ragged_dot")
        x, r = (a[:1, :3] for a in common.inputs())  # 3 tokens on 8 devices
        ref = common.step(common.layer(cfg), x, r)
        mesh = common.make_mesh(shape, axis_types=kinds[kind])
        got = common.step(common.layer(cfg, mesh), x, r, mesh=mesh)
        name = f"odd_tokens_{'sparse' if sparse else 'dense'}_{kind}_{shape}"
        cases[name] = {"errors": common.max_errors(ref, got)}


@contextlib.contextmanager
def emulated_ragged_exchange():
    """The ragged exchange with ``ragged_all_to_all``'s semantics emulated by
    ``all_gather`` (XLA:CPU does not implement it)."""
    real = exchange.ragged_all_to_all
    exchange.ragged_all_to_all = exchange.emulated_ragged_all_to_all
    try:
        yield
    finally:
        exchange.ragged_all_to_all = real


# (mesh shape, axis types, fused?, inside jax.set_mesh?): on the five meshes
# Explicit axes (jax.make_mesh's) without a mesh context and mixed ones inside
# one (Auto ones are every other case here); both contexts on (2, 2, 2).
AXIS_TYPE_PLAN = (
    [(shape, "explicit", True, False) for shape in common.MESHES]
    + [(shape, "mixed", True, True) for shape in common.MESHES]
    + [((2, 2, 2), "explicit", True, True), ((2, 2, 2), "auto", True, True),
       ((2, 2, 2), "explicit", False, False), ((2, 2, 2), "explicit", False, True)]
)


def axis_type_cases(cases, refs):
    """Meshes made the way JAX's docs make them (``jax.make_mesh``: Explicit axes),
    Auto and mixed axis types, called inside ``jax.set_mesh`` or not: each the
    single-device result."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    explicit, auto = (AxisType.Explicit,) * 3, (AxisType.Auto,) * 3
    mixed = (AxisType.Explicit, AxisType.Auto, AxisType.Explicit)
    types = {"explicit": explicit, "auto": auto, "mixed": mixed}
    for shape, kind, fused, context in AXIS_TYPE_PLAN:
        cfg = common.config(fused_moe_mlp=fused, gmm_backend="ragged_dot")
        mesh = jax.make_mesh(shape, common.AXES, axis_types=types[kind])
        layout = "fused" if fused else "unfused"
        where = "set_mesh" if context else "no_context"
        compare(cases, f"axis_types_{kind}_{layout}_{where}_{shape}", cfg, shape,
                refs[("ragged_dot", fused)], mesh=mesh, context=context)
    # A user's input already sharded over the mesh (batch over data, or seq over expert).
    for spec in (P("data"), P(None, "expert")):
        mesh = jax.make_mesh((2, 4, 1), common.AXES, axis_types=explicit)
        cfg = common.config(fused_moe_mlp=True, gmm_backend="ragged_dot")
        compare(cases, f"axis_types_explicit_input_{spec}", cfg, (2, 4, 1),
                refs[("ragged_dot", True)], mesh=mesh, input_spec=spec)


def bad_meshes(base):
    devices = np.array(jax.devices())
    attempts = {
        "experts_not_divisible": (base.replace(num_experts=6),
                                  common.make_mesh((2, 4, 1))),
        "mlp_not_divisible": (base.replace(mlp_dim=6), common.make_mesh((2, 1, 4))),
        "unknown_axis": (base, Mesh(devices.reshape(2, 4), ("data", "experts"))),
    }
    out = {}
    for name, (cfg, mesh) in attempts.items():
        try:
            MoE(cfg, rngs=nnx.Rngs(0), mesh=mesh)
            out[name] = {"raised": None, "message": ""}
        except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
            out[name] = {"raised": type(e).__name__, "message": str(e)}
    return out


def forward(model, mesh):
    x, _ = common.inputs()
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def main() -> None:
    assert jax.device_count() == 8, jax.device_count()
    cases = {}
    # Every mesh, fused and unfused, on the ragged_dot grouped matmul (the quickest to
    # compile on CPU); the CPU default ("auto": cpu_kernel for f32) and tiled (the
    # bf16 and GPU default) on the mesh with all three axes.
    plan = [("ragged_dot", shape) for shape in common.MESHES]
    plan += [("auto", (2, 2, 2)), ("tiled", (2, 2, 2))]
    refs = {}
    for fused in (True, False):
        for backend, shape in plan:
            cfg = common.config(fused_moe_mlp=fused, gmm_backend=backend)
            if (backend, fused) not in refs:
                refs[backend, fused] = common.step(common.layer(cfg), *common.inputs())
            name = f"sparse_{'fused' if fused else 'unfused'}_{backend}_{shape}"
            compare(cases, name, cfg, shape, refs[backend, fused])
        if fused:
            # ragged exchange: jax.lax.ragged_all_to_all is GPU/TPU only; its
            # semantics emulated with all_gather check the offset bookkeeping here.
            cfg = common.config(fused_moe_mlp=True, gmm_backend="ragged_dot")
            with emulated_ragged_exchange():
                for shape in [(2, 2, 2), (1, 8, 1)]:
                    compare(cases, f"ragged_emulated_fused_{shape}", cfg, shape,
                            refs["ragged_dot", True],
                            run_as=cfg.replace(expert_all_to_all="ragged"))
    axis_type_cases(cases, refs)
    odd_token_counts(cases)
    for fused in (True, False):
        for backend in ("auto", "tiled"):
            user_shard_map_case(cases, fused, backend)
    # dense path with a mesh (plain sharding annotations)
    dense = common.config(sparse_matmul=False)
    ref = common.step(common.layer(dense), *common.inputs())
    compare(cases, "dense_(2, 2, 2)", dense, (2, 2, 2), ref)
    # a capacity smaller than the worst case drops rows, and says how many
    cfg = common.config(fused_moe_mlp=True, expert_capacity_factor=0.5, gmm_backend="ragged_dot")
    mesh = common.make_mesh((1, 8, 1))
    out, aux = forward(common.layer(cfg, mesh), mesh)
    cases["capacity_0.5_(1, 8, 1)"] = {
        "errors": {}, "dropped_rows": int(aux["dropped_rows"]),
        "finite": bool(np.isfinite(np.asarray(out)).all())}
    # the ragged exchange drops the same rows as the buckets
    with emulated_ragged_exchange():
        model = common.layer(cfg, mesh)
        model.config = cfg.replace(expert_all_to_all="ragged")
        rag_out, rag_aux = forward(model, mesh)
    cases["capacity_0.5_ragged_vs_buckets"] = {
        "errors": {"out": common._err(out, rag_out)},
        "dropped_rows": int(rag_aux["dropped_rows"])}
    global_concat_case(cases, common.config(fused_moe_mlp=True, mlp_bias=False,
                                            shared_experts=0, gmm_backend="ragged_dot"))
    # sharded initialisation: the constructor under jit places each shard directly
    mesh = common.make_mesh((2, 2, 2))
    cfg = common.config(fused_moe_mlp=True)
    jitted = nnx.jit(lambda: MoE(cfg, rngs=nnx.Rngs(0), mesh=mesh))()
    eager = MoE(cfg, rngs=nnx.Rngs(0), mesh=mesh)
    def spec(a):
        entries = list(a.sharding.spec)
        return entries + [None] * (a.ndim - len(entries))

    jit_init = {"wi_spec": spec(jitted.wi.get_value()), "wo_spec": spec(jitted.wo.get_value()),
                "max_diff": common._err(eager.wi.get_value(), jitted.wi.get_value())}
    print(json.dumps({"cases": cases, "jit_init": jit_init,
                      "bad_meshes": bad_meshes(common.config()),
                      "ragged_lowering": ragged_lowering(),
                      "layer_collectives": layer_collectives()}))


if __name__ == "__main__":
    main()
