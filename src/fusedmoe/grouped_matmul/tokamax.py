"""Backend ``"tokamax"``: :func:`tokamax.ragged_dot_general` (optional extra ``tokamax``).

tokamax picks Mosaic kernels on TPU, Mosaic GPU or Triton kernels on GPU and
XLA's ``ragged_dot`` elsewhere (so on CPU it costs what ``"ragged_dot"`` costs).

The gradient is ours, not tokamax's (a custom VJP, like :mod:`fusedmoe.grouped_matmul._vjp`'s):
tokamax's GPU kernels take two operands of one dtype only (bf16 x bf16 or
f16 x f16; tokamax 0.0.17's Mosaic GPU kernel raises ``NotImplementedError:
lhs and rhs must have same dtype`` otherwise), and tokamax's own VJP hands its
kernels the cotangent as it comes, f32 when the forward asked for an f32
result, beside a bf16 weight. Here every product, forward and backward, runs
with both operands in one dtype, the promoted dtype of the forward's inputs
(the cotangent is cast to it), and asks for an f32 result:

- forward  ``out[rows of g] = lhs[rows of g] @ rhs[g]``;
- ``dlhs[rows of g] = dout[rows of g] @ rhs[g].T`` (tokamax's transposed-weight
  form, as its own VJP runs it);
- ``drhs[g] = lhs[rows of g].T @ dout[rows of g]`` (its ragged-contracting form).

``tgmm`` is differentiable the same way (its gradients are two ``gmm`` products).
Written out here rather than through :func:`fusedmoe.grouped_matmul._vjp.differentiable_pair`,
whose backward hands a kernel the cotangent and one primal but not the dtype the
forward computed in, which is the dtype every tokamax product must get.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fusedmoe.grouped_matmul._vjp import _like_primal
from fusedmoe.grouped_matmul.ragged_dot import _TGMM_DIMS

# out[rows of g] = lhs[rows of g] @ rhs[g]: lhs [M, K], rhs [G, K, N].
_GMM_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [1]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)
# out[rows of g] = lhs[rows of g] @ rhs[g].T: lhs [M, N], rhs [G, K, N].
_GMM_T_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)


@functools.cache
def unavailable_reason() -> str | None:
    """None when tokamax imports and its kernels run on this platform.

    Importing is not enough: tokamax's GPU kernels are written against one jax's
    Pallas API, and a tokamax release paired with a newer jax fails inside them
    (tokamax 0.0.12 on jax 0.11.2 and an H200: ``pl.dot`` removed, Mosaic GPU's
    ``Mesh`` changed). So a small product, value and gradient, f32 and bf16, is
    run once here (:func:`_probe`), and a failure makes the backend unavailable,
    with the reason, rather than an error deep in a kernel at the user's first step.
    """
    try:
        import tokamax
    except Exception as exc:
        return (
            f"tokamax is not installed ({exc.__class__.__name__}: {exc}); "
            "install the extra: pip install 'fusedmoe[tokamax]'"
        )
    try:
        _probe()
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        version = getattr(tokamax, "__version__", "?")
        return (
            f"tokamax {version} failed on {jax.default_backend()} with jax {jax.__version__} "
            f"({exc.__class__.__name__}: {first_line}); install a tokamax release made "
            "for this jax, or pick another backend"
        )
    return None


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
        return jnp.sum(gmm(lhs, rhs, group_sizes, jnp.float32))

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


def _import_tokamax():
    import tokamax
    from absl import flags

    # tokamax reads its options through absl flags and, if nobody parsed them,
    # parses sys.argv itself -- which fails under any other program's arguments
    # (pytest's, ours). Mark them parsed so its defaults apply.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def _operand_dtype(a, b):
    """The one dtype both operands of every product take: the forward inputs'
    promoted dtype (bf16 for bf16 x bf16, f32 for bf16 x f32)."""
    return jnp.result_type(a.dtype, b.dtype)


def _zero_rows_past_groups(out, group_sizes):
    """``gmm`` promises zeros past ``sum(group_sizes)``; tokamax's GPU kernels may
    leave those rows unwritten (XLA's ``ragged_dot``, its CPU fallback, zeroes them)."""
    valid = jnp.arange(out.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], out, jnp.zeros((), out.dtype))


def _times_weight(lhs, rhs, group_sizes, out_dtype, transpose_rhs: bool, dtype):
    """``lhs[rows of g] @ rhs[g]`` (``@ rhs[g].T`` with ``transpose_rhs``), both
    operands in ``dtype``, accumulated and returned by tokamax in f32."""
    tokamax = _import_tokamax()
    out = tokamax.ragged_dot_general(
        lhs.astype(dtype),
        rhs.astype(dtype),
        group_sizes,
        _GMM_T_DIMS if transpose_rhs else _GMM_DIMS,
        preferred_element_type=jnp.float32,
    )
    return _zero_rows_past_groups(out, group_sizes).astype(out_dtype)


def _t_times_rows(lhs, dout, group_sizes, out_dtype, dtype):
    """``lhs[rows of g].T @ dout[rows of g]``, ``[G, K, N]``, both operands in ``dtype``."""
    tokamax = _import_tokamax()
    out = tokamax.ragged_dot_general(
        lhs.astype(dtype),
        dout.astype(dtype),
        group_sizes,
        _TGMM_DIMS,
        preferred_element_type=jnp.float32,
    )
    return out.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(lhs, rhs, group_sizes, out_dtype):
    return _times_weight(lhs, rhs, group_sizes, out_dtype, False, _operand_dtype(lhs, rhs))


def _gmm_fwd(lhs, rhs, group_sizes, out_dtype):
    return gmm(lhs, rhs, group_sizes, out_dtype), (lhs, rhs, group_sizes)


def _gmm_bwd(out_dtype, residuals, dout):
    lhs, rhs, group_sizes = residuals
    dtype = _operand_dtype(lhs, rhs)
    dlhs = _times_weight(dout, rhs, group_sizes, lhs.dtype, True, dtype)
    drhs = _t_times_rows(lhs, dout, group_sizes, rhs.dtype, dtype)
    return _like_primal(dlhs, lhs), _like_primal(drhs, rhs), None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tgmm(lhs, dout, group_sizes, out_dtype):
    return _t_times_rows(lhs, dout, group_sizes, out_dtype, _operand_dtype(lhs, dout))


def _tgmm_fwd(lhs, dout, group_sizes, out_dtype):
    return tgmm(lhs, dout, group_sizes, out_dtype), (lhs, dout, group_sizes)


def _tgmm_bwd(out_dtype, residuals, dw):
    lhs, dout, group_sizes = residuals
    dtype = _operand_dtype(lhs, dout)
    dlhs = _times_weight(dout, dw, group_sizes, lhs.dtype, True, dtype)
    ddout = _times_weight(lhs, dw, group_sizes, dout.dtype, False, dtype)
    return _like_primal(dlhs, lhs), _like_primal(ddout, dout), None


tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)
