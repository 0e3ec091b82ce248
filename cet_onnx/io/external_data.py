"""Weights that stay on disk: what cet-onnx adds to onnx-ir's lazy external tensors.

onnx-ir loads external initializers as memory-mapped :class:`onnx_ir.ExternalTensor` objects and
writes them back out without holding them in memory. Three things it does not do, kept here:

* **checks at load time** (:func:`check_external`): every external path stays inside the
  model's folder, names an existing file, and its ``offset``/``length`` lie inside that file and
  match the tensor's type and shape — a one-line input error naming the tensor, before any
  work, instead of a failure when the weight is first read (onnx-ir checks containment only
  then, and never the length);
* **reads that release their pages** (:class:`LazyValues`): an ``ExternalTensor`` keeps its
  mapping once read, so a loop over every weight of a large model would keep them all
  resident; here each read maps a fresh view that goes away with the array;
* **a digest of the bytes** (:func:`data_digest`) for probe-cache keys: the graph alone only
  names the files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper

from cet_onnx.errors import InputError

#: Models whose initializers hold at least this many bytes in external data files keep them on disk.
LAZY_BYTES = 2**30

#: Unchanged initializers that stay on disk and total at least this many bytes are streamed into
#: the output's data file (``OUT.data``) instead of being copied into the output model in memory.
STREAM_BYTES = 2**26

_CHUNK = 64 * 2**20


# --------------------------------------------------------------------------- checks on the file's protobuf

def proto_external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Tensors of a protobuf model (subgraphs included) whose data is in external files."""
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def data_nbytes(dtype: ir.DataType, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this type and shape needs (sub-byte types packed, rounded up; None for strings)."""
    if dtype == ir.DataType.STRING:
        return None
    count = int(np.prod(shape, dtype=np.int64))
    return -(-count * dtype.bitwidth // 8)


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
    shape = tuple(int(d) for d in tensor.dims)
    need = data_nbytes(ir.DataType(tensor.data_type), shape)
    if info.length is not None and need is not None and length != need:
        raise InputError(f"tensor '{tensor.name}': external data holds {length} bytes, its type and shape "
                         f"{list(shape)} need {need}")
    return path, offset, length


def check_external(model: onnx.ModelProto, path: Path) -> int:
    """Check every external tensor of the file at ``path``; returns the bytes they occupy."""
    base = path.parent.resolve()
    total = 0
    for tensor in proto_external_tensors(model):
        info = external_data_helper.ExternalDataInfo(tensor)
        target = (base / info.location).resolve()
        if base != target and base not in target.parents:
            raise InputError(f"{path}: tensor '{tensor.name}' points to external data "
                             f"'{info.location}' outside the model's folder")
        if not target.is_file():
            raise InputError(f"{path}: tensor '{tensor.name}' needs external data file "
                             f"'{info.location}', which does not exist")
        try:
            total += span(tensor, base)[2]
        except InputError as exc:
            raise InputError(f"{path}: {exc} (truncated file?)") from None
    return total


# --------------------------------------------------------------------------- the in-memory model

def external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """Initializers of every graph (subgraphs included) whose data is still in a file."""
    return [v.const_value for g in model.graphs() for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)]


def external_nbytes(model: ir.Model) -> int:
    """Bytes the model's external tensors occupy in their files."""
    return sum(t.length if t.length is not None else t.nbytes for t in external_tensors(model))


def data_dir(model: ir.Model) -> str | None:
    """The folder external data paths are relative to, when ``model`` still refers to external files."""
    tensors = external_tensors(model)
    return str(tensors[0].base_dir) if tensors else None


def _fresh(t: ir.ExternalTensor) -> ir.ExternalTensor:
    return ir.ExternalTensor(t.location, t.offset, t.length, t.dtype, shape=t.shape, name=t.name,
                             base_dir=t.base_dir)


class LazyValues(Mapping):
    """Name → float32 value of the weights; external ones read from disk on every access.

    A float32 weight on disk comes back as a read-only memory map whose pages are released when
    the array is dropped, so a loop over the weights holds about one at a time.
    """

    def __init__(self, tensors: Mapping[str, ir.TensorProtocol]) -> None:
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        arr = _fresh(t).numpy() if isinstance(t, ir.ExternalTensor) else t.numpy()
        return np.asarray(arr).astype(np.float32, copy=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _chunks(t: ir.ExternalTensor) -> Iterator[bytes]:
    """The bytes of an external tensor, in pieces of at most 64 MB."""
    left = t.length if t.length is not None else t.nbytes
    with open(t.path, "rb") as f:
        f.seek(t.offset or 0)
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise InputError(f"tensor '{t.name}': external data file '{t.path}' ended early")
            yield chunk
            left -= len(chunk)


def data_digest(model: ir.Model) -> bytes:
    """SHA-256 over the bytes of every external tensor (for cache keys: the graph alone names only files)."""
    h = hashlib.sha256()
    for t in external_tensors(model):
        h.update((t.name or "").encode())
        for chunk in _chunks(t):
            h.update(chunk)
    return h.digest()


def load_into(model: ir.Model) -> int:
    """Read every external initializer of ``model`` into memory; returns how many."""
    n = len(external_tensors(model))
    if n:
        ir.external_data.load_to_model(model)
    return n
