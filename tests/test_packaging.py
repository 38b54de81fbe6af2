"""What ``pip install .`` (not editable) gets: the wheel holds every module, the
kernel's C++ source (compiled on first use), the training text and ``py.typed``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_wheel_ships_sources_data_and_types(tmp_path):
    # Built from a copy, so the checkout gets no build/ or egg-info of its own.
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__",
                                                                            "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(tree), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fusedmoe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "src" / "fusedmoe"
    shipped = [p for p in package.rglob("*")
               if (p.suffix in (".py", ".cc", ".h", ".txt") or p.name == "py.typed")
               and "__pycache__" not in p.parts]
    for path in shipped:
        assert f"fusedmoe/{path.relative_to(package).as_posix()}" in names, path
    assert "fusedmoe/grouped_matmul/cpu_kernel.cc" in names
    assert "fusedmoe/py.typed" in names
