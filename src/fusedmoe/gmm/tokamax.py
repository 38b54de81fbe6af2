"""Backend ``"tokamax"``: :func:`tokamax.ragged_dot` (optional extra ``tokamax``).

tokamax picks Mosaic kernels on TPU, Triton on GPU and XLA's ``ragged_dot``
elsewhere (so on CPU it costs what ``"ragged_dot"`` costs). Its gradient is
tokamax's own.
"""

from __future__ import annotations

import jax.numpy as jnp

from fusedmoe.gmm.ragged_dot import _TGMM_DIMS


def unavailable_reason() -> str | None:
    try:
        import tokamax  # noqa: F401
    except Exception as exc:
        return (
            f"tokamax is not installed ({exc.__class__.__name__}: {exc}); "
            "install the extra: pip install 'fusedmoe[tokamax]'"
        )
    return None


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


