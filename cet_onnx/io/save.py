"""Write a model and its side files atomically, through onnx-ir.

Everything is written into a temporary folder beside the target and renamed into place only
when every write (and, for a model with external data, ``onnx.checker`` on the written file)
succeeded; the model file is renamed last, so its presence means the write completed.
A model with ``external=True`` (over 2 GB, or still referring to large external tensors of the
input) gets every tensor over 1 KB in ``<name>.data`` beside it; onnx-ir streams tensors that
are still on disk from file to file without holding them in memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnx_ir as ir

from cet_onnx.errors import InputError, RuntimeFailure, first_line
from cet_onnx.io import external_data
from cet_onnx.io.atomic import Staging

#: Alignment of tensors in ``<name>.data`` (onnxruntime memory-maps page-aligned data).
DATA_ALIGNMENT = 4096


def _drop_initializer_types(model: ir.Model) -> None:
    """No value_info entry per initializer (onnx-ir writes one; the tensor already carries type and shape)."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if not value.is_graph_input() and value.const_value is not None:
                value.type, value.shape = None, None


def _save_with_data(model: ir.Model, target: Path) -> None:
    """``target`` plus ``<name>.data`` holding every tensor over 1 KB, page-aligned."""
    ir.save(model, target, external_data=target.name + ".data", size_threshold_bytes=1024,
            alignment=DATA_ALIGNMENT, align_threshold=0)


def _write_model(model: ir.Model, target: Path, external: bool) -> list[str]:
    """Write ``model`` at ``target``; the names of the files written."""
    _drop_initializer_types(model)
    if not external:
        external_data.load_into(model)  # small leftovers of a model kept on disk go into the file
        ir.save(model, target)
        return [target.name]
    data_name = target.name + ".data"
    _save_with_data(model, target)
    try:
        onnx.checker.check_model(str(target), full_check=True)
    except Exception as exc:
        raise RuntimeFailure(f"the quantized model fails onnx.checker: {first_line(exc)}") from None
    return [data_name, target.name]


def save_model(model: ir.Model, path: str | os.PathLike, extra_files: dict[str, bytes] | None = None,
               external: bool = False) -> None:
    """Write ``model`` at ``path`` and ``extra_files`` (name → bytes) beside it, atomically."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: output folder '{parent}' does not exist")
    try:
        with Staging(parent, path.name) as staging:
            names = _write_model(model, staging.folder / path.name, external)
            for name, data in (extra_files or {}).items():
                (staging.folder / name).write_bytes(data)
            staging.commit([*(extra_files or {}), *names])  # the model last: its presence means the write completed
    except OSError as exc:
        raise RuntimeFailure(f"{path}: cannot write output ({exc.strerror or exc})") from None


@contextmanager
def temporary_copy(model: ir.Model) -> Iterator[Path]:
    """The model written to a temporary folder, tensors in ``model.onnx.data`` (no serialized copy in memory)."""
    with tempfile.TemporaryDirectory(prefix="cet-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        _save_with_data(model, path)
        yield path
