"""The floating-point dtypes a layer computes in, by name: the config's and
the command line's one table (no jax import, so ``--help`` stays fast)."""

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
SHORT_NAMES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# Every accepted spelling -> the canonical (NumPy/JAX) name.
ALIASES = {**{name: name for name in FLOAT_DTYPES},
           **{short: name for name, short in SHORT_NAMES.items()}}
