"""Load, prepare and save ONNX models.

Loading checks the file, refuses external-data paths that leave the model's folder,
runs ``onnx.checker``, turns weight-holding ``Constant`` nodes into initializers (Paddle
exports keep weights there), simplifies with onnxsim (a failure only warns) and infers
shapes. Saving is atomic: everything is written to a temporary folder beside the target,
then renamed into place, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import onnx
from onnx import external_data_helper, numpy_helper

from cet_onnx.io import external_data
from cet_onnx.errors import InputError, RuntimeFailure
# moved to the graph passes; re-exported for the loader below and older imports
from cet_onnx.graph.passes.constants_to_initializers import constants_to_initializers  # noqa: F401
from cet_onnx.graph.passes.upgrade_opset import opset_version, upgrade_opset  # noqa: F401

#: Models larger than this are saved with external data (protobuf's 2 GB limit).
PROTOBUF_LIMIT = 2**31 - 2**20


def fits_protobuf(model: onnx.ModelProto) -> bool:
    """True when ``model`` can be serialized as one protobuf (under 2 GB)."""
    try:
        return model.ByteSize() < PROTOBUF_LIMIT
    except Exception:  # upb refuses to even size a message over 2 GB
        return False


def warn(msg: str) -> None:
    """Print a warning line on stderr."""
    print(f"WARNING: {msg}", file=sys.stderr)


def _check_external_paths(model: onnx.ModelProto, path: Path) -> None:
    base = path.parent.resolve()
    for tensor in external_data.external_tensors(model):
        info = external_data_helper.ExternalDataInfo(tensor)
        target = (base / info.location).resolve()
        if base != target and base not in target.parents:
            raise InputError(f"{path}: tensor '{tensor.name}' points to external data "
                             f"'{info.location}' outside the model's folder")
        if not target.is_file():
            raise InputError(f"{path}: tensor '{tensor.name}' needs external data file "
                             f"'{info.location}', which does not exist")
        try:
            external_data.span(tensor, base)
        except InputError as exc:
            raise InputError(f"{path}: {exc} (truncated file?)") from None


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX model; never modifies the file.

    External data is loaded into the proto, unless it holds at least
    :data:`external_data.LAZY_BYTES`: then the tensors keep referring to their files
    (relative to the model's folder, see :func:`data_dir`) and are read when needed.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                         f"{first_line(exc, 'decode failed')})") from None
    if not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    _check_external_paths(model, path)
    lazy = external_data.external_nbytes(external_data.external_tensors(model)) + model.ByteSize() \
        >= external_data.LAZY_BYTES
    if not lazy:
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise InputError(f"{path}: cannot read external data ({exc})") from None
    try:
        if lazy:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = first_line(exc, "invalid model")
        raise InputError(f"{path}: invalid ONNX model: {first}") from None
    return model


def data_dir(model: onnx.ModelProto, path: str | os.PathLike) -> str | None:
    """The folder external data paths are relative to, when ``model`` still refers to external files."""
    return str(Path(path).parent) if external_data.has_external(model) else None


def simplify(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Run onnxsim; on any failure warn and return the model unchanged."""
    try:
        import onnxsim
    except ImportError:
        warn("onnxsim is not installed; continuing without simplification")
        return model
    if external_data.has_external(model):
        warn(f"{source}: weights stay on disk (large model), skipping onnxsim simplification")
        return model
    if not fits_protobuf(model):
        warn(f"{source}: larger than 2 GB, skipping onnxsim simplification")
        return model
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:
        warn(f"{source}: onnxsim failed ({first_line(exc)}); "
             "continuing with the unsimplified model")
        return model
    if not ok:
        warn(f"{source}: onnxsim could not validate its result; continuing with the unsimplified model")
        return model
    return simplified


def infer_shapes(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Shape inference; models over 2 GB are inferred without their weights."""
    try:
        if fits_protobuf(model):
            return onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        warn(f"{source}: shape inference failed ({first_line(exc)}); continuing")
    return model


def prepare_model(path: str | os.PathLike, do_simplify: bool = True) -> onnx.ModelProto:
    """Load → Constant weights to initializers → simplify → shape inference."""
    model = load_model(path)
    constants_to_initializers(model)
    if do_simplify:
        model = simplify(model, str(path))
        constants_to_initializers(model)
    return infer_shapes(model, str(path))


def save_model(model: onnx.ModelProto, path: str | os.PathLike, extra_files: dict[str, bytes] | None = None,
               check: bool = False, external_from: str | None = None) -> None:
    """Write ``model`` (and ``extra_files`` beside it) atomically.

    Everything goes to a temporary folder in the target's folder first; only when all
    writes succeeded (and, with ``check``, the written model passed ``onnx.checker``) are
    the files renamed into place. Models over 2 GB get their weights in ``<name>.data``
    beside the model. ``external_from``: the folder the model's external tensors refer to;
    their bytes are streamed into ``<name>.data`` (with every inline tensor over 1 KB).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: output folder '{parent}' does not exist")
    staging = Staging(parent, path.name)
    tmpdir = staging.folder
    try:
        names = [path.name]
        tmp_model = tmpdir / path.name
        if external_from is not None:
            data_name = path.name + ".data"
            tensors = [t for t in external_data.all_tensors(model)
                       if external_data.is_external(t) or len(t.raw_data) > 1024]
            external_data.write_data_file(tensors, external_from, tmpdir / data_name, data_name)
            onnx.save_model(model, str(tmp_model))
            names.append(data_name)
        elif not fits_protobuf(model):
            data_name = path.name + ".data"
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            names.append(data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        if check:
            try:
                onnx.checker.check_model(str(tmp_model), full_check=True)
            except Exception as exc:
                raise RuntimeFailure(f"the quantized model fails onnx.checker: "
                                     f"{first_line(exc)}") from None
        for name, data in (extra_files or {}).items():
            (tmpdir / name).write_bytes(data)
            names.append(name)
        staging.commit(names[1:] + names[:1])  # the model last: its presence means the write completed
    except OSError as exc:
        raise RuntimeFailure(f"{path}: cannot write output ({exc.strerror or exc})") from None
    finally:
        staging.discard()


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Name → initializer of the main graph."""
    return {t.name: t for t in model.graph.initializer}


def to_array(tensor: onnx.TensorProto):
    """numpy view of an initializer."""
    return numpy_helper.to_array(tensor)


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    locations = {external_data_helper.ExternalDataInfo(t).location
                 for t in external_data_helper._get_all_tensors(model)
                 if external_data_helper.uses_external_data(t)}
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
