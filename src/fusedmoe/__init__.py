"""fusedmoe: fast, trustworthy Mixture-of-Experts layers for JAX."""

from fusedmoe import gmm  # the package, callable as the function (see fusedmoe/gmm)
from fusedmoe.config import MoEConfig
from fusedmoe.gmm import available_backends, backend_names, tgmm
from fusedmoe.layer import MoE, RoutingBias

__version__ = "0.1.0"

__all__ = [
    "MoE",
    "MoEConfig",
    "RoutingBias",
    "available_backends",
    "backend_names",
    "gmm",
    "tgmm",
    "__version__",
]
