"""Initializer tensors the passes write: packed integer codes and plain numpy arrays.

Both are built as ``onnx.TensorProto`` with ``raw_data`` (exactly the bytes the rewriter always
wrote) and handed to onnx-ir wrapped, so serializing the model copies them unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, numpy_helper

from cet_onnx.quant.packing import pack_bits
from cet_onnx.quant.sizes import container_bits

_ELEM_TYPE = {8: TensorProto.INT8, 4: TensorProto.INT4, 2: TensorProto.INT2}


def elem_type_for_bits(bits: int) -> int:
    """ONNX element type (TensorProto enum) that stores ``bits``-bit signed codes."""
    return _ELEM_TYPE[container_bits(bits)]


def make_int_tensor(name: str, q: np.ndarray, bits: int) -> TensorProto:
    """An initializer holding ``q`` (int8 codes in range for ``bits``) in its packed ONNX type."""
    t = TensorProto()
    t.name = name
    t.data_type = elem_type_for_bits(bits)
    t.dims.extend(int(d) for d in np.shape(q))
    t.raw_data = pack_bits(q, container_bits(bits))
    return t


def int_tensor(name: str, q: np.ndarray, bits: int) -> ir.TensorProtocol:
    """:func:`make_int_tensor` as an onnx-ir tensor."""
    return ir.serde.TensorProtoTensor(make_int_tensor(name, q, bits))


def array_tensor(name: str, array: np.ndarray) -> ir.TensorProtocol:
    """``array`` as an onnx-ir tensor (``numpy_helper.from_array``'s encoding)."""
    return ir.serde.TensorProtoTensor(numpy_helper.from_array(array, name))


def float_numpy(dtype: ir.DataType | None) -> np.dtype:
    """The numpy type of scales for a tensor of ``dtype``: float16 / bfloat16 follow it, all else is float32.

    DequantizeLinear's output has its scale's type, so a half-precision model's scales are half precision.
    """
    if dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return np.dtype(dtype.numpy())
    return np.dtype(np.float32)
