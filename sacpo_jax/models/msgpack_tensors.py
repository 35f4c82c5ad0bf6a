"""Flax msgpack files read in place, and written one tensor at a time.

Wire format (flax/serialization.py: ``msgpack_serialize``, ``_ndarray_to_bytes``,
``_chunk``): a pytree is nested msgpack maps; an array leaf is msgpack ext type 1 whose
payload is the msgpack array ``[shape, dtype name, C-order bytes]``; an array above
``MAX_CHUNK_SIZE`` bytes is stored as the map ``{"__msgpack_chunked_array__": True,
"shape": {"0": d0, ...}, "chunks": {"0": flat_chunk, ...}}``.

``flax.serialization.msgpack_restore`` copies every tensor into memory. Here a small parser
walks only the msgpack framing (data, never code) and records where each array's bytes lie;
``view`` then memory-maps one tensor, so an importer holds at most the tensor it is placing.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from sacpo_jax.models.safetensors_io import DTYPES, PlannedTensor, TensorInfo

NDARRAY_EXT = 1  # flax _MsgpackExtType.ndarray
MAX_CHUNK_SIZE = 2**30  # flax serialization.MAX_CHUNK_SIZE
CHUNKED = "__msgpack_chunked_array__"
DTYPE_BY_NAME = {dtype.name: dtype for dtype in DTYPES.values()}


class MsgpackError(ValueError):
    """A file that is not (or not entirely) a Flax msgpack checkpoint; one line."""


@dataclass(frozen=True)
class StoredArray:
    """Where an array's bytes lie: (file offset, element count) per flat chunk."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]
    chunks: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Blob:
    """A msgpack bin value: ``length`` bytes at ``offset`` (EasyLM nests msgpack in it)."""

    offset: int
    length: int


class _Parser:
    """Reads msgpack values from a byte buffer, leaving array bytes where they are."""

    def __init__(self, path: str, buf: Any, pos: int, end: int):
        self.path, self.buf, self.pos, self.end = path, buf, pos, end

    def _take(self, n: int) -> int:
        start = self.pos
        if start + n > self.end:
            raise MsgpackError(f"{self.path}: truncated msgpack at byte {start}")
        self.pos += n
        return start

    def _unpack(self, fmt: str) -> Any:
        start = self._take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def _str(self, n: int) -> str:
        start = self._take(n)
        try:
            return bytes(self.buf[start : start + n]).decode()
        except UnicodeDecodeError:
            raise MsgpackError(f"{self.path}: invalid UTF-8 string at byte {start}") from None

    def value(self) -> Any:
        """One value; an ndarray ext becomes a StoredArray, a bin a Blob."""
        b = self._unpack(">B")
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.value() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return self._str(b & 0x1F)
        fixed = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in fixed:
            return fixed[b]
        sized = {  # byte -> (length format, kind)
            0xC4: (">B", "bin"), 0xC5: (">H", "bin"), 0xC6: (">I", "bin"),
            0xC7: (">B", "ext"), 0xC8: (">H", "ext"), 0xC9: (">I", "ext"),
            0xD9: (">B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str"),
            0xDC: (">H", "array"), 0xDD: (">I", "array"),
            0xDE: (">H", "map"), 0xDF: (">I", "map"),
        }  # fmt: skip
        if b in sized:
            fmt, kind = sized[b]
            n = self._unpack(fmt)
            if kind == "bin":
                return Blob(self._take(n), n)
            if kind == "ext":
                return self._ext(n)
            if kind == "str":
                return self._str(n)
            if kind == "array":
                return [self.value() for _ in range(n)]
            return self._map(n)
        if 0xD4 <= b <= 0xD8:
            return self._ext(1 << (b - 0xD4))
        numbers = {
            0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
            0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
        }  # fmt: skip
        if b in numbers:
            return self._unpack(numbers[b])
        raise MsgpackError(f"{self.path}: not msgpack (byte 0x{b:02x} at {self.pos - 1})")

    def _map(self, n: int) -> dict:
        out = {}
        for _ in range(n):
            key = self.value()
            out[str(key)] = self.value()
        return out

    def _ext(self, n: int) -> StoredArray:
        code = self._unpack(">b")
        start = self._take(n)
        if code != NDARRAY_EXT:
            raise MsgpackError(f"{self.path}: unsupported msgpack ext type {code} at byte {start}")
        inner = _Parser(self.path, self.buf, start, start + n)
        fields = inner.value()
        if not (isinstance(fields, list) and len(fields) == 3 and isinstance(fields[2], Blob)):
            raise MsgpackError(f"{self.path}: malformed array at byte {start}")
        shape, dtype_name, data = fields
        if dtype_name not in DTYPE_BY_NAME:
            raise MsgpackError(f"{self.path}: unsupported array dtype {dtype_name!r}")
        dtype = DTYPE_BY_NAME[dtype_name]
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize != data.length:
            raise MsgpackError(f"{self.path}: array at byte {start} has the wrong byte count")
        return StoredArray(self.path, dtype, tuple(shape), ((data.offset, count),))


def _unchunk(value: dict, where: str) -> StoredArray:
    """A chunked-array map as one StoredArray over its flat chunks."""
    shape = tuple(value["shape"][str(i)] for i in range(len(value["shape"])))
    chunks = [value["chunks"][str(i)] for i in range(len(value["chunks"]))]
    if not chunks or not all(isinstance(c, StoredArray) for c in chunks):
        raise MsgpackError(f"{where}: malformed chunked array")
    first = chunks[0]
    return StoredArray(first.path, first.dtype, shape, tuple(p for c in chunks for p in c.chunks))


def flatten(tree: Any, prefix: str = "") -> dict[str, StoredArray]:
    """'/'-joined path -> StoredArray for every array leaf of a parsed tree."""
    if isinstance(tree, StoredArray):
        return {prefix: tree}
    if not isinstance(tree, dict):
        return {}
    if CHUNKED in tree:
        return {prefix: _unchunk(tree, prefix)}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}/{key}" if prefix else key))
    return out


def _open(path: str) -> mmap.mmap:
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            raise MsgpackError(f"{path}: empty file")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_tree(path: str) -> dict[str, StoredArray]:
    """The arrays of a file holding one msgpack pytree (``flax.serialization.to_bytes``)."""
    buf = _open(path)
    parser = _Parser(path, buf, 0, len(buf))
    tree = parser.value()
    if not isinstance(tree, dict):
        raise MsgpackError(f"{path}: not a Flax msgpack checkpoint (its top level is not a map)")
    if parser.pos != len(buf):
        raise MsgpackError(f"{path}: not a Flax msgpack checkpoint (data after the first object)")
    return flatten(tree)


def read_records(path: str) -> Iterator[tuple[Any, Any]]:
    """(key, value) per record of a stream of msgpack ``[key, bin]`` pairs whose bin holds
    one msgpack value (EasyLM's streaming checkpoints); values are parsed in place."""
    buf = _open(path)
    parser = _Parser(path, buf, 0, len(buf))
    while parser.pos < len(buf):
        start = parser.pos
        record = parser.value()
        if not (isinstance(record, list) and len(record) == 2 and isinstance(record[1], Blob)):
            raise MsgpackError(f"{path}: not a stream of [key, bytes] records (at byte {start})")
        key, blob = record
        inner = _Parser(path, buf, blob.offset, blob.offset + blob.length)
        yield key, inner.value()


class MsgpackReader:
    """Arrays by name with the SafetensorsReader interface (info, view, ``in``)."""

    def __init__(self, arrays: dict[str, StoredArray]):
        self._arrays = arrays

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def names(self) -> list[str]:
        return list(self._arrays)

    def info(self, name: str) -> TensorInfo:
        a = self._arrays[name]
        return TensorInfo(a.path, a.dtype, a.shape)

    def view(self, name: str) -> np.ndarray:
        """A memory-mapped view (one chunk) or a copy of the chunks joined (chunked)."""
        a = self._arrays[name]
        parts = [
            np.memmap(a.path, dtype=a.dtype, mode="r", offset=offset, shape=(count,))
            for offset, count in a.chunks
            if count
        ]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts or [np.zeros(0, a.dtype)])
        return flat.reshape(a.shape)


# ----------------------------------------------------------------------------- writing


def _ext_header(length: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if length in fixed:
        return struct.pack(">Bb", fixed[length], NDARRAY_EXT)
    for code, fmt, limit in ((0xC7, ">B", 2**8), (0xC8, ">H", 2**16), (0xC9, ">I", 2**32)):
        if length < limit:
            return struct.pack(">B", code) + struct.pack(fmt, length) + bytes([NDARRAY_EXT])
    raise MsgpackError(f"an array of {length} bytes is too large for one msgpack ext")


def _bin_header(length: int) -> bytes:
    for code, fmt, limit in ((0xC4, ">B", 2**8), (0xC5, ">H", 2**16), (0xC6, ">I", 2**32)):
        if length < limit:
            return struct.pack(">B", code) + struct.pack(fmt, length)
    raise MsgpackError(f"a value of {length} bytes is too large for msgpack")


def _write_array(f, array: np.ndarray) -> None:
    """``_ndarray_to_bytes`` as an ext, written without building the payload in memory."""
    head = (
        b"\x93"
        + msgpack.packb(list(array.shape))
        + msgpack.packb(array.dtype.name)
        + _bin_header(array.nbytes)
    )
    f.write(_ext_header(len(head) + array.nbytes))
    f.write(head)
    f.write(np.ascontiguousarray(array).view(np.uint8).data)


def _write_leaf(f, array: np.ndarray) -> None:
    if array.nbytes <= MAX_CHUNK_SIZE:
        _write_array(f, array)
        return
    size = max(1, MAX_CHUNK_SIZE // array.dtype.itemsize)
    flat = array.reshape(-1)
    chunks = [flat[i : i + size] for i in range(0, flat.size, size)]
    shape = {str(i): d for i, d in enumerate(array.shape)}
    f.write(_map_header(3) + msgpack.packb(CHUNKED) + msgpack.packb(True))
    f.write(msgpack.packb("shape") + msgpack.packb(shape))
    f.write(msgpack.packb("chunks") + _map_header(len(chunks)))
    for i, chunk in enumerate(chunks):
        f.write(msgpack.packb(str(i)))
        _write_array(f, chunk)


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x80 | n])
    return struct.pack(">BH", 0xDE, n) if n < 2**16 else struct.pack(">BI", 0xDF, n)


Tree = dict[str, "Tree | PlannedTensor"]


def write_tree(path: str, tree: Tree) -> None:
    """Write a nested dict of PlannedTensors as ``flax.serialization.to_bytes`` would,
    producing one tensor at a time, atomically."""

    def write(f, node: Tree) -> None:
        f.write(_map_header(len(node)))
        for key in sorted(node):  # flax's tree_map copy sorts dict keys
            value = node[key]
            f.write(msgpack.packb(key))
            if isinstance(value, dict):
                write(f, value)
            else:
                _write_leaf(f, _produced(value))

    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f, tree)
    os.replace(tmp, path)


def leaves_in_write_order(tree: Tree) -> list[PlannedTensor]:
    """The tensors of ``tree`` in the order ``write_tree`` produces them."""
    out = []
    for key in sorted(tree):
        value = tree[key]
        out += leaves_in_write_order(value) if isinstance(value, dict) else [value]
    return out


def _produced(tensor: PlannedTensor) -> np.ndarray:
    values = np.ascontiguousarray(tensor.produce(), dtype=tensor.dtype)
    if values.shape != tuple(tensor.shape):
        raise MsgpackError(f"{tensor.name}: produced {values.shape}, planned {tensor.shape}")
    return values
