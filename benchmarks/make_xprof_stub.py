"""Build the 2 KB stub wheel ``xprof-0.0.0-py3-none-any.whl`` carried to GPU runs.

tokamax (0.0.17) imports ``xprof.cli.tools.get_kernel_stats_tool`` when it is
imported (``tokamax/_src/benchmarking.py``) and uses it only for its own
xprof-timed benchmarks. The real xprof wheel is 32 MB and pulls in more
(duckdb, google-cloud-storage, ...); this stub holds only that module, whose
``compute_kernel_stats`` raises ``NotImplementedError``. With it tokamax 0.0.17
imported on jax 0.11.2 (CPU and an H200, 2026-11-27; docs/notebook.md).

    python3 benchmarks/make_xprof_stub.py [OUT_DIR]     # default: .whl/
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import zipfile

NAME, VERSION = "xprof", "0.0.0"

FILES = {
    "xprof/__init__.py": (
        '"""Stub of xprof carried for fusedmoe GPU runs (not the real package).\n'
        "\n"
        "tokamax imports xprof.cli.tools.get_kernel_stats_tool at import time and\n"
        "uses it only for its xprof-timed benchmarks; the real wheel is 32 MB.\n"
        '"""\n'
    ),
    "xprof/cli/__init__.py": "",
    "xprof/cli/tools/__init__.py": "",
    "xprof/cli/tools/get_kernel_stats_tool.py": (
        "def compute_kernel_stats(*args, **kwargs):\n"
        "  raise NotImplementedError('xprof stub: the real xprof is not installed')\n"
    ),
    f"{NAME}-{VERSION}.dist-info/METADATA": (
        f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"
        "Summary: stub of xprof for tokamax imports\n"
    ),
    f"{NAME}-{VERSION}.dist-info/WHEEL": (
        "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    ),
}


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build(out_dir: str) -> str:
    """Write the wheel into ``out_dir``; return its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{NAME}-{VERSION}-py3-none-any.whl")
    record = f"{NAME}-{VERSION}.dist-info/RECORD"
    lines = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, text in FILES.items():
            data = text.encode()
            wheel.writestr(name, data)
            lines.append(_record_line(name, data))
        wheel.writestr(record, "\n".join([*lines, f"{record},,"]) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=".whl",
                        help="where the wheel goes (default .whl)")
    print(build(parser.parse_args().out_dir))
