"""Which backends a benchmark does not time here, and why: one set of rules for
``fusedmoe bench`` and ``fusedmoe bench-gmm``.

A backend is skipped, with the reason in its rows, when

- it cannot run here (:func:`fusedmoe.grouped_matmul.available_backends` says why);
- it is ``megablox`` off a TPU, where it runs in Pallas interpret mode (correct,
  but far too slow at real sizes): unless it was named with ``--backend`` and
  the product is at most :data:`INTERPRET_MAX_FLOPS` a call;
- it computes a masked dense product over all G groups here (``ragged_dot`` off
  TPU and ``tokamax`` on CPU, through XLA's lowering of ``ragged_dot``), G times
  the FLOPs: above ``--dense-expansion-max-groups`` groups when that is given,
  else when the expanded product is estimated to take more than
  :data:`MAX_EXPANDED_SECONDS` a call.

``auto`` is judged as the backend it picks for the platform and dtype.
A row that fails when it runs (out of memory, say) is a different matter: the
commands record it as skipped with its error (:func:`fusedmoe.bench.timing.skip_reasons`).
"""

from __future__ import annotations

import dataclasses

# Order-of-magnitude dense GEMM rates (FLOP/s) per platform, used only to
# estimate whether a dense expansion would take more than MAX_EXPANDED_SECONDS;
# never reported as a measurement.
DENSE_RATE_ESTIMATE = {"cpu": 150e9}
DENSE_RATE_ESTIMATE_ACCELERATOR = 50e12
MAX_EXPANDED_SECONDS = 1.0
# The largest megablox product (FLOPs a call) run in interpret mode: bench-gmm's
# --quick forward, M=512, K=256, N=512.
INTERPRET_MAX_FLOPS = 2 * 512 * 256 * 512


@dataclasses.dataclass(frozen=True)
class SkipRules:
    """The rules of one run: its platform, the backends named on its command
    line (empty when ``--backend`` was not given), and ``--dense-expansion-max-groups``."""

    platform: str
    named: frozenset[str] = frozenset()
    max_expanded_groups: int | None = None

    def backend_used(self, backend: str, dtype) -> str:
        """The backend that runs for ``backend`` on ``dtype`` inputs (``auto``'s pick)."""
        from fusedmoe.grouped_matmul.registry import auto_backend

        return auto_backend(self.platform, dtype) if backend == "auto" else backend

    def reason(self, backend: str, dtype, groups: int, flops: float) -> str | None:
        """Why ``backend`` is not timed on ``dtype`` inputs with ``groups`` groups and
        ``flops`` FLOPs a forward call (the dense GEMMs' of equal work), or None."""
        from fusedmoe.grouped_matmul import available_backends

        name = self.backend_used(backend, dtype)
        via = f" (auto picks {name} here)" if name != backend else ""
        unavailable = available_backends()[name]
        if unavailable is not None:
            return unavailable + via
        if name == "megablox" and self.platform != "tpu":
            if name not in self.named:
                return ("off TPU megablox runs in Pallas interpret mode; "
                        "ask for it with --backend megablox" + via)
            if flops > INTERPRET_MAX_FLOPS:
                return (f"off TPU megablox runs in Pallas interpret mode: at most "
                        f"{INTERPRET_MAX_FLOPS / 1e6:.0f} MFLOP a call, this case "
                        f"{flops / 1e6:.0f}; use smaller shapes" + via)
        if self._expands(name):
            return self._expansion_reason(name, groups, flops, via)
        return None

    def _expands(self, name: str) -> bool:
        return ((name == "ragged_dot" and self.platform != "tpu")
                or (name == "tokamax" and self.platform == "cpu"))

    def _expansion_reason(self, name: str, groups: int, flops: float, via: str) -> str | None:
        head = f"{name} is a masked dense product over all {groups} groups on {self.platform}"
        if self.max_expanded_groups is not None:
            if groups <= self.max_expanded_groups:
                return None
            return (f"{head}, ~G x dense; raise --dense-expansion-max-groups "
                    f"(now {self.max_expanded_groups})" + via)
        rate = DENSE_RATE_ESTIMATE.get(self.platform, DENSE_RATE_ESTIMATE_ACCELERATOR)
        seconds = flops * groups / rate
        if seconds <= MAX_EXPANDED_SECONDS:
            return None
        return (f"{head} (~{seconds:.0f} s a call); "
                f"time it with --dense-expansion-max-groups {groups}" + via)
