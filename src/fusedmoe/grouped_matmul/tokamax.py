"""Backend ``"tokamax"``: :func:`tokamax.ragged_dot_general` (optional extra ``tokamax``).

tokamax picks Mosaic kernels on TPU, Mosaic GPU or Triton kernels on GPU and
XLA's ``ragged_dot`` elsewhere (so on CPU it costs what ``"ragged_dot"`` costs).

tokamax's GPU kernels take two operands of one dtype only (bf16 x bf16 or
f16 x f16; tokamax 0.0.17's Mosaic GPU kernel raises ``NotImplementedError:
lhs and rhs must have same dtype`` otherwise), and tokamax's own VJP hands its
kernels the cotangent as it comes (f32 when the forward asked for an f32
result) beside a bf16 weight. So the gradient is the shared custom VJP
(:mod:`fusedmoe.grouped_matmul.backend`), and every product, forward and
backward, runs with both operands in ``operand_dtype``, the promoted dtype of
the forward's inputs, asking tokamax for an f32 result.

tokamax reads its options through absl flags and, when nobody has parsed
them, parses ``sys.argv`` itself, which fails under another program's
arguments (pytest's, ours). :func:`_absl_flags_left_alone` lets it read its
defaults and then puts absl's flags back as the host program had them.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fusedmoe.grouped_matmul.backend import (
    BEST,
    GMM_DIMS,
    GMM_T_DIMS,
    NEVER,
    TGMM_DIMS,
    Backend,
    zero_rows_past_groups,
)


@functools.cache
def _import_reason() -> str | None:
    try:
        import tokamax  # noqa: F401
    except Exception as exc:
        return (
            f"tokamax is not installed ({exc.__class__.__name__}: {exc}); "
            "install the extra: pip install 'fusedmoe[tokamax]'"
        )
    return None


@functools.cache
def _kernel_reason() -> str | None:
    """None when tokamax's kernels give right numbers on the default device.

    Importing is not enough on a GPU: tokamax's kernels are written against one
    jax's Pallas API, and a tokamax release paired with a newer jax fails inside
    them (tokamax 0.0.12 on jax 0.11.2 and an H200: ``pl.dot`` removed, Mosaic
    GPU's ``Mesh`` changed). So a small product, value and gradient, f32 and
    bf16, runs once (:func:`_probe`), and a failure makes the backend
    unavailable, with the reason, rather than an error deep in a kernel at the
    user's first step. On CPU tokamax runs XLA's ``ragged_dot``: nothing to probe.
    """
    if not _runs_own_kernels():
        return None
    try:
        _probe()
    except Exception as exc:
        import tokamax

        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        version = getattr(tokamax, "__version__", "?")
        return (
            f"tokamax {version} failed on {jax.default_backend()} with jax {jax.__version__} "
            f"({exc.__class__.__name__}: {first_line}); install a tokamax release made "
            "for this jax, or pick another backend"
        )
    return None


def _runs_own_kernels() -> bool:
    """Whether tokamax runs its own kernels here (not XLA's ``ragged_dot``)."""
    return jax.default_backend() != "cpu"


_PROBE_SIZES = (48, 80)


def _probe() -> None:
    """Value and gradient of a 2-group product of ones, f32 and bf16, compiled and
    run on the default device; raise if it fails or gives a wrong number.

    It runs as a compiled program (``jax.jit(...).lower(...).compile()`` on NumPy
    inputs), not under ``jax.ensure_compile_time_eval()``: that evaluates eagerly
    every operation without traced operands, and a kernel's own grid queries are
    such operations (tokamax 0.0.17's Mosaic GPU kernel calls
    ``jax.lax.axis_index("mn")``, which then ran outside its kernel: ``NameError:
    unbound axis name: mn``). Lowered from concrete NumPy inputs and called with
    them, the program also runs right away when first asked from inside a trace.
    """
    sizes = np.asarray(_PROBE_SIZES, np.int32)
    rows, k, n = sum(_PROBE_SIZES), 128, 128

    def loss(lhs, rhs, group_sizes):
        return jnp.sum(BACKEND.gmm(lhs, rhs, group_sizes, jnp.float32))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for dtype in (np.dtype(np.float32), np.dtype(jnp.bfloat16)):
        lhs = np.ones((rows, k), dtype)
        rhs = np.ones((len(sizes), k, n), dtype)
        compiled = step.lower(lhs, rhs, sizes).compile()
        value, (dlhs, drhs) = jax.block_until_ready(compiled(lhs, rhs, sizes))
        # Ones: every output is k, every dlhs entry n, drhs[g] the rows of group g.
        want_drhs = np.broadcast_to(sizes[:, None, None], (len(sizes), k, n))
        for what, got, want in (
            ("value", value, rows * k * n),
            ("d lhs", dlhs, np.full((rows, k), n)),
            ("d rhs", drhs, want_drhs),
        ):
            if not np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32)):
                raise RuntimeError(f"wrong {dtype.name} {what} from a product of ones")


@contextlib.contextmanager
def _absl_flags_left_alone():
    """Let tokamax read its absl flags' defaults, then leave absl's flags as the
    host program had them (unparsed stays unparsed; parsed is never touched)."""
    from absl import flags

    if flags.FLAGS.is_parsed():
        yield
        return
    flags.FLAGS.mark_as_parsed()
    try:
        yield
    finally:
        flags.FLAGS.unparse_flags()


def _ragged_dot_general(lhs, rhs, group_sizes, dims, operand_dtype):
    """tokamax's product of ``lhs`` and ``rhs``, both in ``operand_dtype``, in f32."""
    import tokamax

    with _absl_flags_left_alone():
        return tokamax.ragged_dot_general(
            lhs.astype(operand_dtype), rhs.astype(operand_dtype), group_sizes, dims,
            preferred_element_type=jnp.float32,
        )


class Tokamax(Backend):
    """tokamax's kernels: the GPU choice for 16-bit inputs where they run."""

    name = "tokamax"

    def unavailable_reason(self) -> str | None:
        return _import_reason() or _kernel_reason()

    def suitability(self, platform, dtype) -> int:
        sixteen_bit = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        # Its GPU kernels are 16-bit only, and its f32 fallback there is slower
        # than tiled (docs/backends.md). Elsewhere it is XLA's ragged_dot.
        return BEST if platform == "gpu" and sixteen_bit else NEVER

    def times_weight(self, lhs, rhs, group_sizes, out_dtype, *, transpose_rhs, operand_dtype):
        out = _ragged_dot_general(lhs, rhs, group_sizes, GMM_T_DIMS if transpose_rhs else GMM_DIMS,
                                  operand_dtype)
        # tokamax's GPU kernels may leave the rows past the groups unwritten.
        return zero_rows_past_groups(out, group_sizes).astype(out_dtype)

    def t_times_rows(self, lhs, dout, group_sizes, out_dtype, *, operand_dtype):
        return _ragged_dot_general(lhs, dout, group_sizes, TGMM_DIMS, operand_dtype).astype(
            out_dtype)


BACKEND = Tokamax()
