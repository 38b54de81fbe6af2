"""Suite-wide settings.

On GPU, XLA computes float32 matrix products in TF32 by default (about 1e-3
relative error), which the f32 tests' 1e-5 tolerances are not written for:
there the suite asks for full float32 products. CPU products are always full
float32, so nothing changes on CPU.
"""

import jax

if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")
