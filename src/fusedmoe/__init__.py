"""fusedmoe: fast, trustworthy Mixture-of-Experts layers for JAX."""

from fusedmoe.gmm import available_backends, backend_names, gmm, tgmm

__version__ = "0.1.0"

__all__ = ["gmm", "tgmm", "available_backends", "backend_names", "__version__"]
