"""Reading and writing safetensors files ourselves: headers checked before any
data is read, tensors read one at a time, shards written in a streamed plan.

The format is an 8-byte little-endian header length, a JSON header
(``name -> {dtype, shape, data_offsets}``, plus ``__metadata__``), then the raw
bytes. Reading it directly (rather than through memory maps) keeps host
memory to the one tensor being read, and lets every problem be named before
any data is touched: a shard shorter than its header says (truncated), an
index that names a missing file or a tensor its file does not hold, duplicate
names. Pickled ``*.bin`` files are never read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from fusedmoe.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype name -> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64), "BOOL": np.dtype(np.bool_),
}
NAME_OF_DTYPE = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F32", "BF16", "F16")  # what a model's weights may be stored as


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file``, ``[start, end)`` from the file's start."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one ``.safetensors`` file, checked against its size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated (shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(
                    f"{file}: truncated: the header says {n} bytes of JSON, the file has "
                    f"{size - 8} after the length"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not a safetensors file (bad JSON header: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    base = 8 + n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = entry["dtype"], tuple(entry["shape"])
            start, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - start != nbytes or start < 0:
            raise CheckpointError(
                f"{file}: tensor {name!r}: offsets [{start}, {end}) do not hold shape "
                f"{list(shape)} of {dtype} ({nbytes} bytes)"
            )
        if base + end > size:
            raise CheckpointError(
                f"{file}: truncated: tensor {name!r} needs bytes up to {base + end}, the file "
                f"has {size}"
            )
        out[name] = TensorInfo(file, dtype, shape, base + start, base + end)
    return out


class SafetensorsDir:
    """The tensors of a model directory by name: ``model.safetensors.index.json``
    and the shards it names, else every ``*.safetensors`` file. Headers are read
    and checked at once; data only on :meth:`get`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.info: dict[str, TensorInfo] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            self._from_index(index)
            return
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            extra = ""
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
                extra = " (pickled *.bin/*.pt weights are not read; convert them to safetensors)"
            raise CheckpointError(f"{self.path}: no *.safetensors files{extra}")
        for f in files:
            for name, info in read_header(f).items():
                if name in self.info:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is in both {self.info[name].file.name} "
                        f"and {f.name}"
                    )
                self.info[name] = info

    def _from_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map: {exc})") \
                from None
        headers = {}
        for file_name in sorted(set(weight_map.values())):
            file = self.path / file_name
            if not file.is_file():
                names = [n for n, f in weight_map.items() if f == file_name]
                raise CheckpointError(
                    f"{index}: names shard {file_name!r} (for {len(names)} tensors, e.g. "
                    f"{names[0]!r}), which is not in {self.path}"
                )
            headers[file_name] = read_header(file)
        for name, file_name in weight_map.items():
            if name not in headers[file_name]:
                raise CheckpointError(
                    f"{index}: says tensor {name!r} is in {file_name}, which does not hold it"
                )
            self.info[name] = headers[file_name][name]

    # --- the API the MoE-layer loader uses ---
    def __contains__(self, name: str) -> bool:
        return name in self.info

    @property
    def file_of(self) -> dict[str, Path]:
        return {name: info.file for name, info in self.info.items()}

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.info if n.startswith(prefix))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name].shape

    def dtype(self, name: str) -> str:
        return self.info[name].dtype

    def where(self, name: str) -> str:
        return self.info[name].file.name if name in self.info else "no shard"

    def check_expected(self, expected: Mapping[str, tuple[int, ...]], *, whose: str,
                       implied_by: str = "") -> None:
        """Every ``name -> shape`` of ``expected`` is here, with that shape and a
        float dtype (headers only); else a ``CheckpointError`` naming the file, the
        tensor, ``whose`` it is ("for layer 3 (model_type mixtral)") and, for a
        wrong shape, ``implied_by`` (the config fields behind it)."""
        shards = ", ".join(sorted({info.file.name for info in self.info.values()}))
        for name, shape in expected.items():
            if name not in self:
                raise CheckpointError(f"{self.path}: missing tensor {name!r} {whose}; "
                                      f"searched {shards}")
            if self.shape(name) != shape:
                raise CheckpointError(
                    f"{self.path / self.where(name)}: tensor {name!r} has shape "
                    f"{list(self.shape(name))}, but config.json implies {list(shape)}"
                    + (f" ({implied_by})" if implied_by else ""))
            if self.dtype(name) not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{self.path / self.where(name)}: tensor {name!r} has dtype "
                    f"{self.dtype(name)}; expected one of {sorted(FLOAT_DTYPES)}")

    def get(self, name: str) -> np.ndarray:
        """One tensor, read into a fresh array (the only host copy)."""
        info = self.info[name]
        out = np.empty(info.shape, DTYPES[info.dtype])
        with open(info.file, "rb") as f:
            f.seek(info.start)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != info.end - info.start:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        return out


# ----------------------------------------------------------------------------- writing
def plan_shards(specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
    """Tensors (in order) grouped into shards of at most ``max_shard_bytes`` (a
    larger tensor gets a shard of its own)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * np.dtype(spec[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header_bytes(shard, metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, shape, dtype in shard:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAME_OF_DTYPE[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_shards(directory: Path, specs: list[tuple[str, tuple[int, ...], np.dtype]],
                 tensors: Iterator[tuple[str, np.ndarray]], *, max_shard_bytes: int,
                 metadata: Mapping[str, str] | None = None) -> list[str]:
    """Write ``tensors`` (produced lazily, in the order of ``specs``: name, shape,
    dtype) into ``directory`` as one ``model.safetensors``, or as shards with an
    index when they exceed ``max_shard_bytes``. Returns the files written.

    Each tensor is written as it comes, so host memory holds only what the
    producer holds at once."""
    metadata = {"format": "pt", **(metadata or {})}
    shards = plan_shards(specs, max_shard_bytes)
    files = shard_names(len(shards))
    weight_map = {}
    for file_name, shard in zip(files, shards, strict=True):
        with open(directory / file_name, "wb") as f:
            f.write(_header_bytes(shard, metadata))
            for name, shape, dtype in shard:
                got_name, array = next(tensors)
                if got_name != name or tuple(array.shape) != tuple(shape) \
                        or array.dtype != np.dtype(dtype):
                    raise RuntimeError(
                        f"write_shards: expected {name} {list(shape)} {np.dtype(dtype)}, got "
                        f"{got_name} {list(array.shape)} {array.dtype}"
                    )
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
                weight_map[name] = file_name
    if next(tensors, None) is not None:
        raise RuntimeError("write_shards: more tensors than planned")
    if len(files) > 1:
        total = sum(math.prod(s) * np.dtype(d).itemsize for _, s, d in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files
