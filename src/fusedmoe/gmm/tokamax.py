"""Backend ``"tokamax"``: :func:`tokamax.ragged_dot` (optional extra ``tokamax``).

tokamax picks Mosaic kernels on TPU, Triton on GPU and XLA's ``ragged_dot``
elsewhere (so on CPU it costs what ``"ragged_dot"`` costs). Its gradient is
tokamax's own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fusedmoe.gmm.ragged_dot import _TGMM_DIMS


@functools.cache
def unavailable_reason() -> str | None:
    """None when tokamax imports and its kernels run on this platform.

    Importing is not enough: tokamax's GPU kernels are written against one jax's
    Pallas API, and a tokamax release paired with a newer jax fails inside them
    (tokamax 0.0.12 on jax 0.11.2 and an H200: ``pl.dot`` removed, Mosaic GPU's
    ``Mesh`` changed). So a small product, value and gradient, f32 and bf16, is
    run once here, and a failure makes the backend unavailable, with the reason,
    rather than an error deep in a kernel at the user's first step.
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


def _probe() -> None:
    """Value and gradient of a 2-group product, f32 and bf16, run eagerly (also
    when first asked inside a trace) on the default device."""
    with jax.ensure_compile_time_eval():
        sizes = jnp.asarray([48, 80], jnp.int32)
        for dtype in (jnp.float32, jnp.bfloat16):
            lhs = jnp.ones((128, 128), dtype)
            rhs = jnp.ones((2, 128, 128), dtype)

            def loss(lhs, rhs):
                return jnp.sum(gmm(lhs, rhs, sizes, jnp.float32))

            jax.block_until_ready(jax.grad(loss, argnums=(0, 1))(lhs, rhs))


def _import_tokamax():
    import tokamax
    from absl import flags

    # tokamax reads its options through absl flags and, if nobody parsed them,
    # parses sys.argv itself -- which fails under any other program's arguments
    # (pytest's, ours). Mark them parsed so its defaults apply.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def gmm(lhs, rhs, group_sizes, out_dtype):
    tokamax = _import_tokamax()

    out = tokamax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def tgmm(lhs, dout, group_sizes, out_dtype):
    tokamax = _import_tokamax()

    out = tokamax.ragged_dot_general(
        lhs, dout, group_sizes, _TGMM_DIMS, preferred_element_type=jnp.float32
    )
    return out.astype(out_dtype)


