"""Probes behind the CPU numbers of ``docs/notebook.md`` ("What limits `tiled` on CPU").

Not a test and not the benchmark: side-by-side measurements that explain
why the ``tiled`` backend stops where it does on a CPU. Each prints, per
candidate, the paired ratio to a dense GEMM of equal FLOPs timed round-robin
in the same process (median over rounds of candidate/dense) and the ratio of
the fastest runs.

    python benchmarks/probe_tiled_cpu.py weight-size   # per-expert weight size
    python benchmarks/probe_tiled_cpu.py fused-ffn1    # fused FFN1 schedules
    python benchmarks/probe_tiled_cpu.py copy-free     # weight copy vs in place
    python benchmarks/probe_tiled_cpu.py tile-size     # cost of a dot by its rows
    python benchmarks/probe_tiled_cpu.py fold-activation  # activation inside the FFN1 loop
    python benchmarks/probe_tiled_cpu.py row-tiles     # tiled's whole-tile sizes, G=8
    python benchmarks/probe_tiled_cpu.py copy-free \\
        --xla-flags=--xla_cpu_experimental_ynn_fusion_type=dot

``--xla-flags`` sets ``XLA_FLAGS`` for this process (before jax is imported),
to compare XLA:CPU's dot libraries: the dense reference runs under the same
flags. As in any process that imports ``fusedmoe``, malloc keeps freed memory
(``fusedmoe.allocator``; docs/backends.md, "Host memory on CPU") unless
``FUSEDMOE_MALLOC=0``.
"""

from __future__ import annotations

import argparse
import os
import sys


def _routed_group_sizes(num_experts: int, top_k: int, tokens: int, seed: int = 0):
    """Rows per expert when each token picks ``top_k`` distinct experts uniformly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(tokens)])
    return np.bincount(picks.ravel(), minlength=num_experts).astype(np.int32)


def _masked_tiles(lhs, weight, start, end, out, tile: int = 64, epilogue=None):
    """``out[start:end] = epilogue(lhs[start:end] @ weight())`` in dots of ``tile``
    rows, the last one masked (and kept inside ``lhs``); no ``epilogue``: the
    product itself. ``weight()`` is called inside the loop body, so where its
    slice happens is the caller's choice."""
    import jax
    import jax.numpy as jnp

    m = lhs.shape[0]

    def rows(t, out):
        row = start + t * tile
        at = jnp.minimum(row, m - tile)
        y = jax.lax.dynamic_slice_in_dim(lhs, at, tile) @ weight()
        y = y if epilogue is None else epilogue(y)
        keep = ((at + jnp.arange(tile) >= row) & (at + jnp.arange(tile) < end))[:, None]
        new = jnp.where(keep, y, jax.lax.dynamic_slice_in_dim(out, at, tile))
        return jax.lax.dynamic_update_slice_in_dim(out, new, at, 0)

    return jax.lax.fori_loop(0, (end - start + tile - 1) // tile, rows, out)


def _silu_gated(h):
    """``silu(gate) * up`` of a ``[rows, 2N]`` FFN1 output whose columns are ``[gate | up]``."""
    import jax

    n = h.shape[-1] // 2
    return jax.nn.silu(h[:, :n]) * h[:, n:]


def _column_loop(lhs, rhs, group_sizes, col: int, width: int, epilogue=None):
    """``out[rows of g] = epilogue(lhs[rows of g] @ rhs[g][:, col:col + width])``, f32
    (no ``epilogue``: the product), the weight columns sliced once per group
    inside the loop over groups (one dot per 64 rows). A probe kernel: ``tiled``
    with 64-row tiles only. With ``epilogue=_silu_gated`` on the whole fused
    weight the activation is applied to each tile inside the loop, so the
    ``[M, 2N]`` FFN1 output is never written (the "fold" of issue #3)."""
    import jax
    import jax.numpy as jnp

    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes

    def group(g, out):
        w = jax.lax.dynamic_slice(rhs, (g, 0, col), (1, rhs.shape[1], width))[0]
        return _masked_tiles(lhs, lambda: w, starts[g], ends[g], out, epilogue=epilogue)

    out_width = width // 2 if epilogue is _silu_gated else width
    out = jnp.zeros((lhs.shape[0], out_width), jnp.float32)
    return jax.lax.fori_loop(0, rhs.shape[0], group, out)


def _static_group_loops(lhs, rhs, group_sizes):
    """One loop per group with a *static* weight index ``rhs[g]`` taken inside
    the loop body: with ``--xla_cpu_experimental_ynn_fusion_type=dot`` XLA fuses
    that slice into the dot (a bitcast in the HLO: the weight is read in place,
    never copied)."""
    import jax.numpy as jnp

    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        out = _masked_tiles(lhs, lambda g=g: rhs[g], starts[g], ends[g], out)
    return out


def _tile_loop(lhs, rhs, rows: int):
    """Dots of ``rows`` rows, each against the next of the ``G`` weights
    (cycling), covering ``lhs`` once: the cost of one tile size alone."""
    import jax
    import jax.numpy as jnp

    def body(i, acc):
        x = jax.lax.dynamic_slice_in_dim(lhs, i * rows, rows)
        return acc + x @ rhs[i % rhs.shape[0]]

    init = jnp.zeros((rows, rhs.shape[2]), jnp.float32)
    return jax.lax.fori_loop(0, lhs.shape[0] // rows, body, init)


def _with_row_tiles(tiles: tuple[int, ...], fn, args):
    """``fn`` compiled for ``args`` while ``tiled`` cuts groups into whole
    tiles of ``tiles`` (its ``ROW_TILES`` is read when a product is traced)."""
    import jax

    from fusedmoe.grouped_matmul import tiled

    saved = tiled.ROW_TILES
    tiled.ROW_TILES = tiles
    try:
        # A fresh function object: jax.jit's trace cache is keyed on the
        # function, so jitting ``fn`` itself again would reuse its first trace.
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    finally:
        tiled.ROW_TILES = saved


def _row_tile_candidates():
    """The benchmark's G=8 shape (M=4096, K=1024, N=2048, f32), balanced and
    skewed, forward and forward+backward, under the current ``ROW_TILES`` and
    the earlier ``(256, 64)``."""
    import jax

    import fusedmoe
    from fusedmoe.bench.gmm_bench import _dense_programs, group_sizes
    from fusedmoe.grouped_matmul import tiled

    m, k, n, groups = 4096, 1024, 2048, 8
    kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (m, k))
    w = jax.random.normal(kw, (groups, k, n))
    d = jax.random.normal(kd, (m, n))

    def fwd(x, w, gs):
        return fusedmoe.gmm(x, w, gs, backend="tiled")

    def fwdbwd(x, w, d, gs):
        out, vjp = jax.vjp(lambda x, w: fusedmoe.gmm(x, w, gs, backend="tiled"), x, w)
        return (out, *vjp(d))

    dense_fwd, dense_fwdbwd = _dense_programs()
    out = {"dense fwd": (dense_fwd, (x, w[0])), "dense fwd+bwd": (dense_fwdbwd, (x, w[0], d))}
    for dist in ("balanced", "skewed"):
        gs = jax.numpy.asarray(group_sizes(m, groups, dist, alpha=0.3, seed=0))
        for tiles in (tiled.ROW_TILES, (256, 64)):
            out[f"fwd {dist} {tiles}"] = (_with_row_tiles(tiles, fwd, (x, w, gs)), (x, w, gs))
            out[f"fwd+bwd {dist} {tiles}"] = (
                _with_row_tiles(tiles, fwdbwd, (x, w, d, gs)), (x, w, d, gs))
    return out


def _candidates(probe: str):
    """``name -> (fn, args)``, the dense reference under ``"dense"``."""
    import jax
    import jax.numpy as jnp

    import fusedmoe

    if probe == "row-tiles":
        return _row_tile_candidates()
    key = jax.random.PRNGKey(0)
    tiled = jax.jit(lambda x, w, gs: fusedmoe.gmm(x, w, gs, backend="tiled"))
    dense = jax.jit(lambda x, w: x @ w)
    if probe == "copy-free":
        groups, m, k, n = 64, 4096, 1024, 2048
        gs = jnp.full((groups,), m // groups, jnp.int32)
        x = jax.random.normal(key, (m, k))
        w = jax.random.normal(key, (groups, k, n))
        return {
            "tiled (copies rhs[g])": (tiled, (x, w, gs)),
            "static per-group loops": (jax.jit(_static_group_loops), (x, w, gs)),
            # The floor of any loop of XLA dots: 64-row dots, each against the
            # next weight (read from memory), then all against one weight (in L3).
            "64-row dots, next weight each": (
                jax.jit(lambda x, w: _tile_loop(x, w, 64)), (x, w)),
            "64-row dots, one weight": (
                jax.jit(lambda x, w: _tile_loop(x, w, 64)), (x, w[:1])),
            "cpu_kernel (our FFI kernel)": (
                jax.jit(lambda x, w, gs: fusedmoe.gmm(x, w, gs, backend="cpu_kernel")),
                (x, w, gs)),
            "dense": (dense, (x, w[0])),
        }
    # Qwen3-30B-A3B: 1024 tokens, top-8 of 128 experts, emb 2048, expert mlp 768.
    groups, k, n = 128, 2048, 768
    gs = jnp.asarray(_routed_group_sizes(groups, 8, 1024))
    x = jax.random.normal(key, (int(gs.sum()), k))
    if probe == "tile-size":
        out = {}
        for width in (n, 2 * n):
            w = jax.random.normal(key, (groups, k, width)) * 0.02
            for rows in (8, 16, 64, 256):
                loop = jax.jit(lambda x, w, rows=rows: _tile_loop(x, w, rows))
                out[f"{rows}-row dots, N={width}"] = (loop, (x[:8192], w))
            out[f"dense N={width}"] = (dense, (x, w[0]))
        return out
    if probe == "weight-size":
        out = {}
        for width in (n // 2, n, 2 * n):
            w = jax.random.normal(key, (groups, k, width)) * 0.02
            out[f"N={width}"] = (tiled, (x, w, gs))
            out[f"dense N={width}"] = (dense, (x, w[0]))
        return out
    wi = jax.random.normal(key, (groups, k, 2 * n)) * 0.02  # [G, K, 2, N] viewed as [G, K, 2N]
    if probe == "fold-activation":
        return {
            "unfolded: [M,2N] written, then activation": (
                jax.jit(lambda x, w, gs: _silu_gated(_column_loop(x, w, gs, 0, 2 * n))),
                (x, wi, gs)),
            "folded: activation on each tile": (
                jax.jit(lambda x, w, gs: _column_loop(x, w, gs, 0, 2 * n, _silu_gated)),
                (x, wi, gs)),
            "dense": (jax.jit(lambda x, w: _silu_gated(x @ w)), (x, wi[0])),
        }
    gate, up = wi[:, :, :n], wi[:, :, n:]
    return {
        "fused: one loop on [G,K,2N]": (tiled, (x, wi, gs)),
        "fused: two loops on its column halves": (
            jax.jit(lambda x, w, gs: (_column_loop(x, w, gs, 0, n), _column_loop(x, w, gs, n, n))),
            (x, wi, gs),
        ),
        "unfused: two loops on [G,K,N]": (
            jax.jit(lambda x, a, b, gs: (tiled(x, a, gs), tiled(x, b, gs))),
            (x, gate, up, gs),
        ),
        "dense": (dense, (x, wi[0])),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("weight-size", "fused-ffn1", "copy-free", "tile-size",
                                          "fold-activation", "row-tiles"))
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--xla-flags", default=None, help="XLA_FLAGS for this process")
    return parser


def set_xla_flags(argv: list[str] | None = None) -> None:
    """Put ``--xla-flags`` into ``XLA_FLAGS`` before jax is imported: importing
    ``fusedmoe`` (for its allocator) imports jax, so this runs first."""
    args, _ = _parser().parse_known_args(argv)
    if args.xla_flags is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive count, got {args.rounds}")
    if args.xla_flags is not None and os.environ.get("XLA_FLAGS") != args.xla_flags:
        parser.error("--xla-flags: must be set before jax is imported (run this file as a script)")

    from fusedmoe.bench.timing import paired_ratio, time_side_by_side

    candidates = _candidates(args.probe)
    timings = time_side_by_side(candidates, warmup=1, repeats=args.rounds)
    print(
        f"probe {args.probe}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, {args.rounds} rounds"
    )
    for name, timing in timings.items():
        if name.startswith("dense"):
            continue
        ref = timings[_reference_of(name, timings)]
        print(
            f"  {name:40s} {timing.median * 1e3:7.1f} ms  "
            f"paired {paired_ratio(timing.times, ref.times):.2f}x  "
            f"min {timing.min / ref.min:.2f}x dense"
        )
    return 0


def _reference_of(name: str, timings: dict) -> str:
    """The dense reference of a candidate: ``dense N=..`` where the candidate
    names its width (weight-size, tile-size), ``dense fwd`` / ``dense fwd+bwd``
    where it names its pass (row-tiles), ``dense`` otherwise."""
    for pass_ in ("fwd+bwd", "fwd"):
        if name.startswith(pass_ + " ") and f"dense {pass_}" in timings:
            return f"dense {pass_}"
    width = name[name.index("N=") :] if "N=" in name else None
    return f"dense {width}" if width and f"dense {width}" in timings else "dense"


if __name__ == "__main__":
    set_xla_flags()
    sys.exit(main())
