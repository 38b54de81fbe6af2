"""One of two processes that form one 8-device mesh with ``jax.distributed``.

    python tests/multidevice/two_process.py PROCESS_ID PORT

Each process has 4 CPU devices (``--xla_force_host_platform_device_count=4``);
the coordinator listens on 127.0.0.1:PORT; CPU collectives go through gloo. Both
processes run the layer on a (data, expert, tensor) = (2, 2, 2) mesh, with Auto
and with Explicit axes, and a (1, 8, 1) mesh over all 8 devices (unfused:
(2, 2, 2) only) and compare output, aux
losses and every gradient with the single-device layer computed locally. Prints
one JSON line. Every wait is bounded (initialize / heartbeat / shutdown timeouts
here, a process timeout in the launching test).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402


def main() -> None:
    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in 0.10
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
        initialization_timeout=60, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30,
    )
    assert jax.process_count() == 2 and jax.device_count() == 8, (
        jax.process_count(), jax.device_count())
    assert jax.local_device_count() == 4, jax.local_device_count()
    cases = {}
    for fused in (True, False):
        cfg = common.config(fused_moe_mlp=fused, gmm_backend="ragged_dot")  # quick to compile
        ref = common.step(common.layer(cfg), *common.inputs())  # on this process's device 0
        for shape in [(2, 2, 2), (1, 8, 1)] if fused else [(2, 2, 2)]:
            for kind in ("auto", "explicit") if shape == (2, 2, 2) else ("auto",):
                types = (AxisType.Explicit,) * 3 if kind == "explicit" else None
                mesh = common.make_mesh(shape, axis_types=types)
                got = common.step(common.layer(cfg, mesh), *common.inputs(), mesh=mesh)
                name = f"{'fused' if fused else 'unfused'}_{shape}"
                cases[name if kind == "auto" else f"{name}_explicit"] = {
                    "errors": common.max_errors(ref, got),
                    "dropped_rows": int(got[1]["dropped_rows"]),
                }
    print(json.dumps({"process_id": process_id, "process_count": jax.process_count(),
                      "device_count": jax.device_count(), "cases": cases}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
