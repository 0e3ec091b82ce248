"""Pack integer codes into ONNX INT2 / INT4 / INT8 tensors, and unpack them again.

ONNX stores INT4 two values per byte and INT2 four per byte, the first element in the
lowest bits; a tensor with an odd count pads the last byte with zeros. Packing here is
vectorised numpy and writes ``raw_data`` directly, so multi-GB weights pack quickly.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from cet_onnx.quant.quantizer import QuantizedWeight, WeightFormat, container_bits, packed_nbytes

_ELEM_TYPE = {8: TensorProto.INT8, 4: TensorProto.INT4, 2: TensorProto.INT2}


def elem_type_for_bits(bits: int) -> int:
    """ONNX element type (TensorProto enum) that stores ``bits``-bit signed codes."""
    return _ELEM_TYPE[container_bits(bits)]


def pack_bits(q: np.ndarray, cbits: int) -> bytes:
    """Pack signed codes into ``cbits``-bit fields, little end first."""
    flat = np.asarray(q).astype(np.int8, copy=False).ravel()
    if cbits == 8:
        return flat.tobytes()
    per = 8 // cbits
    mask = (1 << cbits) - 1
    u = flat.view(np.uint8) & np.uint8(mask)
    pad = (-u.size) % per
    if pad:
        u = np.concatenate([u, np.zeros(pad, np.uint8)])
    u = u.reshape(-1, per)
    shifts = (np.arange(per, dtype=np.uint8) * cbits).astype(np.uint8)
    return np.bitwise_or.reduce(u << shifts, axis=1).astype(np.uint8).tobytes()


def unpack_bits(data: bytes, count: int, cbits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` sign-extended int8 codes."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if cbits == 8:
        return raw.view(np.int8)[:count].copy()
    per = 8 // cbits
    shifts = (np.arange(per, dtype=np.uint8) * cbits).astype(np.uint8)
    fields = ((raw[:, None] >> shifts) & np.uint8((1 << cbits) - 1)).ravel()[:count]
    sign = np.uint8(1 << (cbits - 1))
    return (fields.astype(np.int16) - ((fields & sign).astype(np.int16) << 1)).astype(np.int8)


def make_int_tensor(name: str, q: np.ndarray, bits: int) -> TensorProto:
    """An initializer holding ``q`` (int8 codes in range for ``bits``) in its packed ONNX type."""
    cbits = container_bits(bits)
    t = TensorProto()
    t.name = name
    t.data_type = _ELEM_TYPE[cbits]
    t.dims.extend(int(d) for d in np.shape(q))
    t.raw_data = pack_bits(q, cbits)
    return t


def stored_form(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None, int | None, bool]:
    """(codes, scale, zero_point, axis, block_size, needs_reshape) exactly as written to the model.

    INT2 weights always use DequantizeLinear's blocked form: onnxruntime's QDQ selectors
    exclude 4- and 16-bit weights but not 2-bit ones, fuse INT2 weights into QLinearConv /
    QLinearMatMul and then refuse to load the model; blocked scales are never fused. A
    per-channel (or per-tensor) scale becomes one block spanning the whole reduction axis;
    a Conv kernel ``[O, I, k...]`` is stored as ``[O, I·k...]`` and reshaped back after
    dequantization so that its scales are not repeated per kernel position.
    """
    if container_bits(qw.fmt.bits) != 2 or qw.block_size is not None:
        return qw.q, qw.scale, qw.zero_point, qw.axis, qw.block_size, False
    q, c, r = qw.q, qw.channel_axis, qw.reduction_axis
    nch = q.shape[c]
    per_channel = [np.broadcast_to(np.asarray(p), (nch,)) if qw.axis is None else np.asarray(p)
                   for p in (qw.scale, qw.zero_point)]
    if q.ndim > 2 and c == 0:
        q2 = q.reshape(nch, -1)
        scale, zp = (p.reshape(nch, 1) for p in per_channel)
        return q2, scale.astype(np.float32), zp.astype(np.int8), 1, q2.shape[1], True
    # blocked over the whole reduction axis; the parameters repeat along any other axes
    view = [1] * q.ndim
    view[c] = nch
    shape = list(q.shape)
    shape[r] = 1
    scale, zp = (np.broadcast_to(p.reshape(view), shape) for p in per_channel)
    return q, scale.astype(np.float32), zp.astype(np.int8), r, q.shape[r], False


def stored_nbytes(qw: QuantizedWeight) -> int:
    """Bytes of codes, float32 scales and zero points as :func:`stored_form` writes them."""
    cbits = container_bits(qw.fmt.bits)
    _, scale, _, _, _, reshape = stored_form(qw)
    nscale = int(np.prod(np.shape(scale), dtype=np.int64))
    extra = 8 * qw.q.ndim if reshape else 0  # the int64 target shape of the Reshape
    return packed_nbytes(qw.q.size, cbits) + 4 * nscale + packed_nbytes(nscale, cbits) + extra


def format_nbytes(shape: tuple[int, ...], fmt: WeightFormat, channel_axis: int, reduction_axis: int) -> int:
    """Stored bytes of a weight of ``shape`` in ``fmt``, without quantizing it (sizes depend on shapes only)."""
    ndim = len(shape)
    c, r = channel_axis % ndim, reduction_axis % ndim
    if fmt.granularity == "tensor":
        scale_shape, axis, block = (), None, None
    elif fmt.granularity == "channel":
        scale_shape, axis, block = (shape[c],), c, None
    else:
        scale_shape = tuple(-(-d // fmt.block_size) if i == r else d for i, d in enumerate(shape))
        axis, block = r, fmt.block_size
    dummy = QuantizedWeight(q=np.zeros(shape, np.int8), scale=np.ones(scale_shape, np.float32),
                            zero_point=np.zeros(scale_shape, np.int8), axis=axis, block_size=block, fmt=fmt,
                            channel_axis=c, reduction_axis=r)
    return stored_nbytes(dummy)
