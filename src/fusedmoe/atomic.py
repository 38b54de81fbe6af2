"""Atomic writes: nothing half-written is ever left where a reader looks.

Every file or directory the project writes (checkpoints, benchmark JSON,
plots, metrics) is built under a temporary name beside its target and renamed
into place only when complete; on any failure the temporary is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _file_mode() -> int:
    """The mode ``open()`` would give a new file under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# Read once: os.umask can only be read by setting it, which is not thread-safe.
_FILE_MODE = _file_mode()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path beside ``path``; on success rename it over
    ``path``, on failure remove it. The file gets the mode a plain ``open()``
    would give it (``mkstemp`` makes its files private to the owner)."""
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
    os.close(fd)
    try:
        yield tmp
        if os.path.exists(tmp):
            os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, payload: Any, indent: int = 1) -> None:
    """``json.dump(payload)`` to ``path``, atomically."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(payload, f, indent=indent)


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The first of ``path``'s parents that exists but is not a directory, if any:
    the one thing that stops :func:`atomic_directory` from creating the rest."""
    return next((p for p in Path(path).absolute().parents if p.exists() and not p.is_dir()), None)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success rename it to
    ``path`` (replacing an existing one only with ``overwrite``); on failure remove it.

    Missing parent directories are created (as ``orbax`` and Hugging Face's
    ``save_pretrained`` do for their outputs), and removed again if the write
    fails, so a failure leaves the tree as it found it.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace it")
    blocked = file_in_the_way(path)
    if blocked is not None:
        raise NotADirectoryError(f"{path}: {blocked} is a file, not a directory")
    created = [p for p in path.parents if not p.exists()]  # deepest first
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:
            with contextlib.suppress(OSError):  # not empty: someone else wrote there
                parent.rmdir()
        raise
