"""Sizes: does a model fit one protobuf, and how many bytes a saved model takes on disk."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from cet_onnx.io import external_data

#: Models larger than this are saved with external data (protobuf's 2 GB limit).
PROTOBUF_LIMIT = 2**31 - 2**20


def inline_nbytes(model: ir.Model) -> int:
    """Bytes of the initializers held in memory (they are serialized into the protobuf)."""
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))


def fits_protobuf(model: ir.Model | onnx.ModelProto) -> bool:
    """True when ``model`` can be serialized as one protobuf (under 2 GB, with a margin for the graph)."""
    if isinstance(model, ir.Model):
        return inline_nbytes(model) < PROTOBUF_LIMIT
    try:
        return model.ByteSize() < PROTOBUF_LIMIT
    except Exception:  # upb refuses to even size a message over 2 GB
        return False


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus the external data files it references."""
    path = Path(path)
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return total
    locations = {onnx.external_data_helper.ExternalDataInfo(t).location
                 for t in external_data.proto_external_tensors(model)}
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())
