"""Weights that stay on disk: large models are never loaded whole into memory.

A model whose external data is large (see :data:`LAZY_BYTES`) is loaded as a graph only;
its initializers keep their ``external_data`` entries, relative to the model's folder.
Weights are then read one at a time, memory-mapped (:class:`LazyValues`); onnxruntime
sessions read the same files themselves (``runner.make_session(..., data_dir=...)``); and
only the initializers that are written out unchanged are copied into the output model
(:func:`load_into`). Together this keeps the peak memory of a quantize run near one copy
of the float weights (measured by ``tools/large_model_memory.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from cet_onnx.errors import InputError

#: Models whose initializers hold at least this many bytes in external data files keep them on disk.
LAZY_BYTES = 2**30

#: Unchanged initializers that stay on disk and total at least this many bytes are streamed into
#: the output's data file (``OUT.data``) instead of being copied into the output model in memory.
STREAM_BYTES = 2**26

_CHUNK = 64 * 2**20


def is_external(tensor: onnx.TensorProto) -> bool:
    """True when the tensor's bytes live in an external data file."""
    return external_data_helper.uses_external_data(tensor)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers and tensor attributes, subgraphs included."""
    return external_data_helper._get_all_tensors(model)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors whose data is in external files."""
    return [t for t in all_tensors(model) if is_external(t)]


def has_external(model: onnx.ModelProto) -> bool:
    """True when some tensor of ``model`` still refers to an external data file."""
    return any(is_external(t) for t in all_tensors(model))


_SUB_BYTE_BITS = {getattr(onnx.TensorProto, n): b for n, b in
                  (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                  if hasattr(onnx.TensorProto, n)}


def data_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's type and shape need (packed sub-byte types rounded up; None for strings)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    count = int(np.prod([int(d) for d in tensor.dims], dtype=np.int64))
    if tensor.data_type in _SUB_BYTE_BITS:
        return -(-count * _SUB_BYTE_BITS[tensor.data_type] // 8)
    return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize * count


def span(tensor: onnx.TensorProto, data_dir: str | os.PathLike) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, checked against the file's size."""
    info = external_data_helper.ExternalDataInfo(tensor)
    path = Path(data_dir) / info.location
    offset = int(info.offset or 0)
    try:
        size = path.stat().st_size
    except OSError:
        raise InputError(f"tensor '{tensor.name}': external data file '{path}' cannot be read") from None
    length = int(info.length) if info.length is not None else size - offset
    if offset < 0 or length < 0 or offset + length > size:
        raise InputError(f"tensor '{tensor.name}': external data [{offset}, {offset + length}) lies outside "
                         f"'{path}' ({size} bytes)")
    need = data_nbytes(tensor)
    if info.length is not None and need is not None and length != need:
        raise InputError(f"tensor '{tensor.name}': external data holds {length} bytes, its type and shape "
                         f"{[int(d) for d in tensor.dims]} need {need}")
    return path, offset, length


def _chunks(tensor: onnx.TensorProto, data_dir: str | os.PathLike) -> Iterator[bytes]:
    """The bytes of an external tensor, in pieces of at most 64 MB."""
    path, offset, left = span(tensor, data_dir)
    with open(path, "rb") as f:
        f.seek(offset)
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise InputError(f"tensor '{tensor.name}': external data file '{path}' ended early")
            yield chunk
            left -= len(chunk)


def read_bytes(tensor: onnx.TensorProto, data_dir: str | os.PathLike) -> bytes:
    """The raw little-endian bytes of an external tensor."""
    path, offset, length = span(tensor, data_dir)
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def read_array(tensor: onnx.TensorProto, data_dir: str | os.PathLike | None = None) -> np.ndarray:
    """numpy value of a tensor; external float / integer data is memory-mapped read-only, not copied."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    if data_dir is None:
        raise ValueError(f"tensor '{tensor.name}' has external data but no data folder was given")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    path, offset, length = span(tensor, data_dir)
    if dtype.kind in "fiub" and dtype.itemsize in (1, 2, 4, 8) and tensor.data_type != onnx.TensorProto.BFLOAT16 \
            and length == count * dtype.itemsize:
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=offset, shape=shape)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = read_bytes(tensor, data_dir)
    try:
        return numpy_helper.to_array(inline)
    except Exception as exc:
        raise InputError(f"tensor '{tensor.name}': external data does not match its type and shape "
                         f"{list(shape)} ({exc})") from None


class LazyValues(Mapping):
    """Name → float32 value of the weights, read from disk on every access (nothing is cached).

    A float32 weight comes back as a read-only memory map: its pages are read when used and
    released when the array is dropped, so a loop over the weights holds about one at a time.
    """

    def __init__(self, tensors: Mapping[str, onnx.TensorProto], data_dir: str | os.PathLike) -> None:
        self._tensors = dict(tensors)
        self._dir = data_dir

    def __getitem__(self, name: str) -> np.ndarray:
        return np.asarray(read_array(self._tensors[name], self._dir)).astype(np.float32, copy=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def load_into(model: onnx.ModelProto, data_dir: str | os.PathLike) -> int:
    """Copy the data of every external tensor of ``model`` into the proto; returns how many."""
    n = 0
    for t in external_tensors(model):
        data = read_bytes(t, data_dir)
        del t.external_data[:]
        t.ClearField("data_location")  # DEFAULT, written the way an in-memory tensor is
        t.raw_data = data
        n += 1
    return n


def data_digest(model: onnx.ModelProto, data_dir: str | os.PathLike) -> bytes:
    """SHA-256 over the bytes of every external tensor (for cache keys: the graph alone names only files)."""
    h = hashlib.sha256()
    for t in external_tensors(model):
        h.update(t.name.encode())
        for chunk in _chunks(t, data_dir):
            h.update(chunk)
    return h.digest()


def external_nbytes(tensors: list[onnx.TensorProto]) -> int:
    """Bytes the external tensors occupy in their files."""
    total = 0
    for t in tensors:
        info = external_data_helper.ExternalDataInfo(t)
        total += int(info.length) if info.length is not None else data_nbytes(t) or 0
    return total


def write_data_file(tensors: list[onnx.TensorProto], src_dir: str | os.PathLike | None, dst: Path,
                    location: str) -> None:
    """Write the bytes of ``tensors`` into ``dst`` (page-aligned) and point each tensor there as ``location``.

    External tensors are streamed from their files under ``src_dir`` in 64 MB chunks; inline
    ones (which must hold ``raw_data``) have it moved out. Nothing is held in memory beyond one chunk.
    """
    with open(dst, "ab") as out:
        for t in tensors:
            out.write(b"\0" * ((-out.tell()) % 4096))
            start = out.tell()
            if is_external(t):
                for chunk in _chunks(t, src_dir):
                    out.write(chunk)
                length = out.tell() - start
            else:
                length = len(t.raw_data)
                out.write(t.raw_data)
                t.ClearField("raw_data")
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(start)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL

