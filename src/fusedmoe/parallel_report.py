"""Communication bytes of the layer on a mesh, measured and on paper.

Measured: compile the layer for a mesh (abstract inputs, nothing is allocated,
so full model sizes compile on a laptop), read the optimized HLO and add up
the collectives' sizes. On paper: the same counts from the shapes.

    python -m fusedmoe.parallel_report                      # 8 CPU devices, forward
    python -m fusedmoe.parallel_report --mesh 1,4,2 --backward
    python -m fusedmoe.parallel_report --scaling            # DeepSeek-V3 at 8/64/256

The compiled program is XLA:CPU's, so it uses the ``buckets`` exchange; the
ragged column is the analytic count of what ``ragged_all_to_all`` sends on
GPU/TPU under uniform routing.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fusedmoe.config import MoEConfig
from fusedmoe.dispatch import capacity
from fusedmoe.placement import Placement

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter",
               "all-reduce", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
                "pred": 1, "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|f64|s64|u64)\[([0-9,]*)\]")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _group_size(line: str, default: int) -> int:
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form [groups,size]
    return int(m.group(2)) if m else default


_COLLECTIVE_LINE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, dict[str, int]]:
    """Per collective kind in an optimized HLO module (one device's program): how many
    ops, their result bytes ``R``, and the bytes one device sends, by the usual
    model: all-to-all ``R (n-1)/n``; all-reduce (ring) ``2 R (n-1)/n``; all-gather
    ``R (n-1)/n``; reduce-scatter ``R (n-1)``; collective-permute ``R``;
    ragged-all-to-all: its output buffer (an upper bound: it sends the actual rows)."""
    out = {k: {"ops": 0, "result_bytes": 0, "sent_bytes": 0} for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE_LINE.match(line)
        if not m:
            continue
        shape, op, is_start = m.groups()
        if is_start:  # async pair: (operand, result, ...) tuple; count the result once
            sizes_ = [_shape_bytes(f"{d}[{s}]") for d, s in _SHAPE.findall(shape)]
            size = max(sizes_, default=0)
        else:
            size = _shape_bytes(shape)
        n = _group_size(line, num_devices)
        sent = {
            "all-to-all": size * (n - 1) // n, "ragged-all-to-all": size,
            "all-reduce": 2 * size * (n - 1) // n, "all-gather": size * (n - 1) // n,
            "reduce-scatter": size * (n - 1), "collective-permute": size,
        }[op]
        rec = out[op]
        rec["ops"] += 1
        rec["result_bytes"] += size
        rec["sent_bytes"] += sent
    return {k: v for k, v in out.items() if v["ops"]}


def analytic_bytes(config: MoEConfig, tokens_per_device: int, ep: int, tp: int,
                   kind: str = "buckets", dtype_bytes: int = 4, *, dp: int = 1,
                   backward: bool = False) -> dict[str, int]:
    """Bytes one device sends for the layer in one forward pass, or one
    forward+backward pass (``backward``), by the cost model of :func:`collective_bytes`.

    ``tokens_per_device``: tokens each device routes (global tokens / (data*expert)).
    Forward: buckets send ``(ep-1)/ep`` of the ``ep*C`` bucket rows each way; ragged
    sends the rows routed off-device, ``(ep-1)/ep`` of ``T*k`` under uniform routing;
    the tensor-axis psum of the FFN2 partial sums is a ring all-reduce of the rows
    the device's experts processed; a few int32 counts. Backward: both exchanges
    and the psum again (their transposes), plus the sums of gradients of what is
    replicated: the expert weights over ``data`` and the tokens (and combine
    weights) over ``tensor``.
    """
    c = config
    k_dim, rows = c.emb_dim, tokens_per_device * c.num_experts_per_tok
    cap = capacity(rows, ep, c.expert_capacity_factor, limit=rows)
    ring = lambda size, n: 2 * size * (n - 1) // n  # noqa: E731 - all-reduce
    if ep == 1:
        a2a, processed, counts = 0, rows, 0
    elif kind == "buckets":
        a2a = 2 * (ep * cap * k_dim * dtype_bytes * (ep - 1) // ep)
        processed = ep * cap
        counts = c.num_experts * 4 * (ep - 1) // ep
    else:
        a2a = 2 * (rows * k_dim * dtype_bytes * (ep - 1) // ep)
        processed = ep * cap
        counts = c.num_experts * 4 * (ep - 1) // ep + 2 * (ep * ep * 4 * (ep - 1) // ep)
    psum = ring(processed * k_dim * dtype_bytes, tp) if tp > 1 else 0
    # (Not counted: the aux losses' statistics, [G] counts and probability sums
    # all-reduced over data x expert when the caller uses the aux losses.)
    out = {"all_to_all": a2a, "counts": counts, "tensor_psum": psum}
    if backward:
        out["all_to_all"] *= 2
        out["tensor_psum"] *= 2
        w_local = 3 * (c.num_experts // ep) * k_dim * (c.mlp_dim // tp) * dtype_bytes
        out["weight_grad_data_psum"] = ring(w_local, dp) if dp > 1 else 0
        tokens_grad = tokens_per_device * k_dim * dtype_bytes
        out["token_grad_tensor_psum"] = ring(tokens_grad, tp) if tp > 1 else 0
        # the router's [K, G] f32 gradient, replicated on every device
        router = k_dim * c.num_experts * 4
        out["router_grad_psum"] = ring(router, dp * ep * tp) if dp * ep * tp > 1 else 0
    out["total"] = sum(out.values())
    return out


def expert_weight_bytes_per_device(config: MoEConfig, ep: int, tp: int,
                                   dtype_bytes: int = 2) -> int:
    """Routed-expert weight bytes each device holds: ``3 G K N / (ep tp)`` elements."""
    return 3 * config.num_experts * config.emb_dim * config.mlp_dim * dtype_bytes // (ep * tp)


PRESETS: dict[str, MoEConfig] = {
    "mixtral-8x7b": MoEConfig(num_experts=8, num_experts_per_tok=2, emb_dim=4096,
                              mlp_dim=14336, fused_moe_mlp=True),
    "qwen3-30b-a3b": MoEConfig(num_experts=128, num_experts_per_tok=8, emb_dim=2048,
                               mlp_dim=768, fused_moe_mlp=True),
    "deepseek-v3": MoEConfig(num_experts=256, num_experts_per_tok=8, emb_dim=7168,
                             mlp_dim=2048, fused_moe_mlp=True),
}


def compiled_bytes(config: MoEConfig, mesh: Mesh, tokens: int, *, backward: bool = False):
    """Compile the layer for ``tokens`` global tokens on ``mesh`` (abstract
    inputs: nothing is allocated) and count its collectives."""
    from flax import nnx

    from fusedmoe.layer import MoE

    c = config
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(c, rngs=nnx.Rngs(0), mesh=mesh)))
    batch = Placement(c, mesh).token_spec()
    # [tokens, 1, K]: the batch dim split like the layer's tokens, so no reshard
    x = jax.ShapeDtypeStruct((tokens, 1, c.emb_dim), c.compute_dtype,
                             sharding=NamedSharding(mesh, P(*batch)))

    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    if backward:
        fn = jax.jit(jax.grad(lambda state, x: jnp.sum(fwd(state, x)), argnums=(0, 1)))
    else:
        fn = jax.jit(fwd)
    hlo = fn.lower(state, x).compile().as_text()
    return collective_bytes(hlo, mesh.size)


def _fmt(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def report(tokens_per_device: int = 256, mesh_shape=(1, 8, 1), backward: bool = False) -> str:
    """A markdown table: compiled vs analytic bytes one device sends."""
    dp, ep, tp = mesh_shape
    devices = np.array(jax.devices()[: dp * ep * tp]).reshape(mesh_shape)
    mesh = Mesh(devices, ("data", "expert", "tensor"))
    lines = [
        f"mesh (data, expert, tensor) = {mesh_shape} on {jax.devices()[0].platform}, "
        f"{tokens_per_device} tokens per device, f32, "
        f"{'forward+backward' if backward else 'forward'}, exchange=buckets",
        "",
        "| preset | all-to-all ops | a2a sent | all-reduce ops | all-reduce sent | other sent "
        "| compiled total | analytic total | exact match | analytic ragged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cfg in PRESETS.items():
        cfg = cfg.replace(expert_all_to_all="buckets")
        got = compiled_bytes(cfg, mesh, tokens_per_device * dp * ep, backward=backward)
        none = {"ops": 0, "sent_bytes": 0}
        a2a, ar = got.get("all-to-all", none), got.get("all-reduce", none)
        other = sum(v["sent_bytes"] for k, v in got.items() if k not in ("all-to-all",
                                                                          "all-reduce"))
        total = sum(v["sent_bytes"] for v in got.values())
        kw = dict(dp=dp, backward=backward)
        ana = analytic_bytes(cfg, tokens_per_device, ep, tp, "buckets", **kw)["total"]
        rag = analytic_bytes(cfg, tokens_per_device, ep, tp, "ragged", **kw)["total"]
        lines.append(
            f"| {name} | {a2a['ops']} | {_fmt(a2a['sent_bytes'])} | {ar['ops']} | "
            f"{_fmt(ar['sent_bytes'])} | {_fmt(other)} | {_fmt(total)} | {_fmt(ana)} | "
            f"{'yes' if ana == total else f'no ({total - ana:+d} B)'} | {_fmt(rag)} |"
        )
    return "\n".join(lines)


def scaling(preset: str = "deepseek-v3", devices=(8, 64, 256), tokens_per_device: int = 4096,
            dtype_bytes: int = 2, capacity_factor: float = 1.25) -> str:
    """On paper: per-device cost of one MoE layer's forward pass with every device
    on the expert axis (ep = devices, tp = 1); the backward pass sends the same again."""
    base = PRESETS[preset]
    lines = [
        f"{preset}: {base.num_experts} experts top-{base.num_experts_per_tok}, emb "
        f"{base.emb_dim}, mlp {base.mlp_dim}; {tokens_per_device} tokens per device, "
        f"{8 * dtype_bytes}-bit activations and weights; ep = devices, one forward pass",
        "",
        "| devices | experts/device | expert weights/device | ragged sent | ragged recv buffer "
        f"(worst case / capacity {capacity_factor}) | buckets sent (worst case) "
        f"| buckets sent (capacity {capacity_factor}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for ep in devices:
        rows = tokens_per_device * base.num_experts_per_tok
        row_bytes = base.emb_dim * dtype_bytes
        rag = analytic_bytes(base, tokens_per_device, ep, 1, "ragged", dtype_bytes)
        worst = analytic_bytes(base, tokens_per_device, ep, 1, "buckets", dtype_bytes)
        capped = analytic_bytes(base.replace(expert_capacity_factor=capacity_factor),
                                tokens_per_device, ep, 1, "buckets", dtype_bytes)
        lines.append(
            f"| {ep} | {base.num_experts // ep} | "
            f"{_fmt(expert_weight_bytes_per_device(base, ep, 1, dtype_bytes))} | "
            f"{_fmt(rag['total'])} | {_fmt(ep * rows * row_bytes)} / "
            f"{_fmt(ep * capacity(rows, ep, capacity_factor, limit=rows) * row_bytes)} | "
            f"{_fmt(worst['total'])} | {_fmt(capped['total'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import os

    ap = argparse.ArgumentParser(prog="python -m fusedmoe.parallel_report",
                                 description="communication bytes per device per step")
    ap.add_argument("--tokens-per-device", type=int, default=256)
    ap.add_argument("--mesh", default="1,8,1", help="data,expert,tensor sizes")
    ap.add_argument("--backward", action="store_true", help="forward+backward")
    ap.add_argument("--scaling", action="store_true",
                    help="only the on-paper DeepSeek-V3 table at 8/64/256 devices")
    args = ap.parse_args(argv)
    if args.scaling:
        print(scaling())
        return
    shape = tuple(int(s) for s in args.mesh.split(","))
    need = int(np.prod(shape))
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={need}")
    if jax.device_count() < need:
        raise SystemExit(f"--mesh {args.mesh} needs {need} devices, have {jax.device_count()}")
    print(report(args.tokens_per_device, shape, args.backward))


if __name__ == "__main__":
    main()
