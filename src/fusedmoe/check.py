"""``fusedmoe check``: the equivalence checks to run before trusting a config.

On a small random layer built from the given config: fused vs unfused and each
grouped-matmul backend vs the NumPy reference (forward), and fused vs unfused
and each backend vs ``ragged_dot`` (gradients w.r.t. input and every
parameter). Prints a pass/fail table with the largest differences; exit code
0 only when every check passes.
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

from fusedmoe.errors import UsageError

SMALL_SHAPE = dict(num_experts=8, num_experts_per_tok=2, emb_dim=32, mlp_dim=64)
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 3e-3}


class CheckResult(NamedTuple):
    backend: str
    layout: str  # "fused", "unfused" or "both"
    check: str
    max_rel_diff: float  # max |a - b| / max(1, max |b|)
    tolerance: float
    status: str  # "pass", "FAIL" or "skip: <reason>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="MoEConfig YAML file (default: small)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="MoEConfig field overrides"
    )
    parser.add_argument("--backend", action="append", metavar="NAME",
                        help="backend(s) to check (default: every backend available here)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens in the test batch")
    parser.add_argument("--seed", type=int, default=0)


def _config(args):
    from fusedmoe.config import MoEConfig

    try:
        base = MoEConfig.from_yaml(args.config) if args.config else MoEConfig(**SMALL_SHAPE)
        return MoEConfig.from_overrides(list(args.overrides), base=base)
    except FileNotFoundError as exc:
        raise UsageError(f"--config: cannot read {args.config!r} ({exc.strerror})") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"config: {exc}") from None


def _relative_diff(a, b) -> float:
    """Largest |a - b| over every leaf of two trees, relative to max(1, max |b|)."""
    import jax
    import numpy as np

    diffs, scales = [], [1.0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diffs.append(float(np.max(np.abs(x - y), initial=0.0)))
        scales.append(float(np.max(np.abs(y), initial=0.0)))
    return max(diffs, default=0.0) / max(scales)


def run_checks(config, backends: list[str], tokens: int = 32, seed: int = 0) -> list[CheckResult]:
    """Run every check; returns one :class:`CheckResult` per check."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fusedmoe.checkpoint.fusion import fuse_state
    from fusedmoe.grouped_matmul import available_backends
    from fusedmoe.layer import MoE
    from fusedmoe.reference import moe_forward

    tol = TOLERANCE[config.dtype]
    x = jax.random.normal(jax.random.key(seed + 1), (1, tokens, config.emb_dim))
    x = x.astype(config.compute_dtype)
    results: list[CheckResult] = []

    def layer(backend: str, fused: bool) -> MoE:
        return MoE(config.replace(gmm_backend=backend, fused_moe_mlp=fused), rngs=nnx.Rngs(seed))

    def loss_and_grads(m: MoE):
        def loss(m, x):
            out, aux = m(x)
            return jnp.sum(out.astype(jnp.float32) ** 2) + aux["aux_loss"]

        grads, dx = nnx.grad(loss, argnums=(0, 1))(m, x)
        return grads.to_pure_dict(), dx

    def record(backend, layout, check, a, b):
        diff = _relative_diff(a, b)
        status = "pass" if np.isfinite(diff) and diff <= tol else "FAIL"
        results.append(CheckResult(backend, layout, check, diff, tol, status))

    # The trusted pair: the float64 NumPy loop for outputs, and jax's own
    # ragged_dot (unfused) for gradients.
    reference = layer("ragged_dot", False)
    ref_out = moe_forward(np.asarray(x, np.float64)[0], nnx.state(reference).to_pure_dict(),
                          reference.config)
    ref_grads, ref_dx = loss_and_grads(reference)

    reasons = available_backends()
    for backend in backends:
        if reasons.get(backend) is not None:
            results.append(CheckResult(backend, "both", "-", float("nan"), tol,
                                       f"skip: {reasons[backend]}"))
            continue
        outs = {}
        for fused in [False, True] if config.sparse_matmul else [False]:
            m = layer(backend, fused)
            layout = "fused" if fused else "unfused"
            outs[fused] = m(x)[0]
            record(backend, layout, "forward vs NumPy reference", outs[fused][0], ref_out)
            grads, dx = loss_and_grads(m)
            want = fuse_state(ref_grads) if fused else ref_grads
            record(backend, layout, "gradients vs ragged_dot unfused", (grads, dx), (want, ref_dx))
        if True in outs:
            record(backend, "both", "fused vs unfused forward", outs[True], outs[False])
    return results


def print_results(results: list[CheckResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="fusedmoe check (differences relative to max(1, max |expected|))")
    for col in ("backend", "layout", "check", "max diff", "tolerance", "result"):
        table.add_column(col, justify="right" if col in ("max diff", "tolerance") else "left")
    for r in results:
        color = {"pass": "green", "FAIL": "red"}.get(r.status, "yellow")
        diff = "-" if r.max_rel_diff != r.max_rel_diff else f"{r.max_rel_diff:.1e}"
        table.add_row(r.backend, r.layout, r.check, diff, f"{r.tolerance:.0e}",
                      f"[{color}]{r.status}[/{color}]")
    Console(width=max(100, Console().width)).print(table)


def run(args) -> int:
    from fusedmoe.grouped_matmul.registry import backend_names, check_backend_name

    if args.tokens < 1:
        raise UsageError(f"--tokens: got {args.tokens}, expected a positive integer")
    backends = args.backend or [b for b in backend_names() if b != "auto"]
    for b in backends:
        try:
            check_backend_name(b, "--backend")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    config = _config(args)
    results = run_checks(config, backends, tokens=args.tokens, seed=args.seed)
    print_results(results)
    failed = [r for r in results if r.status == "FAIL"]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
