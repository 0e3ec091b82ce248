"""Read an ONNX model from disk into onnx-ir, checked, never modifying the file.

The file is parsed once without its external data; :func:`external_data.check_external`
then checks every external reference (containment, existence, span). Small models have their
external data read into memory; a model whose external data holds at least
:data:`external_data.LAZY_BYTES` keeps it on disk as onnx-ir's memory-mapped
``ExternalTensor`` objects, and onnxruntime reads those files itself. ``onnx.checker`` is
the oracle of validity (on the file's path for a lazy model).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import external_data_helper

from cet_onnx.errors import InputError, first_line
from cet_onnx.io import external_data


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                         f"{first_line(exc, 'decode failed')})") from None
    if not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    return model


def _check(model: onnx.ModelProto | Path, path: Path) -> None:
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{path}: invalid ONNX model: {first_line(exc, 'invalid model')}") from None


def load_model(path: str | os.PathLike) -> ir.Model:
    """The model at ``path`` as an ``ir.Model`` (weights in memory, or left on disk when large)."""
    path = Path(path)
    proto = _read_proto(path)
    lazy = external_data.check_external(proto, path) + proto.ByteSize() >= external_data.LAZY_BYTES
    if lazy:
        _check(path, path)
    else:
        try:
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise InputError(f"{path}: cannot read external data ({exc})") from None
        _check(proto, path)
    model = ir.serde.deserialize_model(proto)
    if lazy:
        ir.external_data.set_base_dir(model.graph, path.parent)
    return model
