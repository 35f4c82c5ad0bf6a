"""Memory-mapped safetensors reading and streaming writing, with bfloat16 support.

File layout: an 8-byte little-endian header length N, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the
raw little-endian tensor bytes, offsets counted from the end of the header.
Reading returns numpy views into an ``np.memmap`` of the file: nothing is read from disk
until a slice of a tensor is copied, so a loader touches only the blocks it places.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from sacpo_jax.errors import SacpoError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(SacpoError, ValueError):
    """A malformed or unreadable safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    path: str
    dtype: np.dtype
    shape: tuple[int, ...]


class SafetensorsReader:
    """All tensors of one or more safetensors files, as lazy memory-mapped views."""

    def __init__(self, files: Iterable[str]):
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for path in files:
            self._read_header(path)

    def _read_header(self, path: str) -> None:
        """Check the header against the file before anything is mapped: its length, every
        tensor's dtype, shape and byte range (inside the file, matching dtype x shape)."""
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8:
                raise SafetensorsError(
                    f"{path}: header length {length} runs past the end of the file "
                    f"({size} bytes): truncated or not a safetensors file"
                )
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: the header is not a JSON object")
        data_start = 8 + length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = _entry(path, name, entry)
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if not 0 <= begin <= end or end - begin != expected:
                raise SafetensorsError(
                    f"{path}: tensor {name}: data_offsets [{begin}, {end}] do not hold "
                    f"{list(shape)} x {DTYPE_NAMES[dtype]} ({expected} bytes)"
                )
            if data_start + end > size:
                raise SafetensorsError(
                    f"{path}: tensor {name} ends at byte {data_start + end}, past the end of "
                    f"the file ({size} bytes): the file is truncated"
                )
            self._infos[name] = TensorInfo(path, dtype, shape)
            self._offsets[name] = (data_start + begin, data_start + end)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def view(self, name: str) -> np.ndarray:
        """A zero-copy view of the tensor backed by a memory map of just its bytes.

        Each call maps the tensor anew and the mapping ends when the last view of it is
        dropped, so the file pages a loader touched stop counting toward its resident
        memory once that parameter is placed (peak RSS ~ parameters + one tensor).
        """
        info = self._infos[name]
        begin, end = self._offsets[name]
        if end == begin:
            return np.zeros(info.shape, info.dtype)
        mapped = np.memmap(info.path, dtype=np.uint8, mode="r", offset=begin, shape=(end - begin,))
        return mapped.view(info.dtype).reshape(info.shape)


def _entry(path: str, name: str, entry) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, offsets) of one header entry, each checked for its type."""
    try:
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError):
        raise SafetensorsError(
            f"{path}: tensor {name}: header entry needs dtype, shape and data_offsets"
        ) from None
    if dtype_name not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
    integers = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
    if not integers or not all(type(v) is int and v >= 0 for v in [*shape, *offsets]):
        raise SafetensorsError(f"{path}: tensor {name}: malformed shape or data_offsets")
    return DTYPES[dtype_name], tuple(shape), (offsets[0], offsets[1])


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its name, dtype, shape and a function producing its values."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_safetensors(
    path: str, tensors: list[PlannedTensor], metadata: dict | None = None
) -> None:
    """Write tensors one at a time (only one is ever materialised), atomically."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in tensors:
            values = np.ascontiguousarray(t.produce(), dtype=t.dtype)
            if values.shape != t.shape:
                raise SafetensorsError(f"{t.name}: produced {values.shape}, planned {t.shape}")
            f.write(values.tobytes())
    os.replace(tmp, path)
