"""Stored sizes of quantized weights, and the layout in which they are written.

Shared by the quantizer (:meth:`QuantizedWeight.nbytes`), the allocator (sizes of formats
before any weight is quantized) and the weight Q/DQ pass (:func:`stored_form` is what it
writes), so all three agree on every byte. Arrays and shapes only: no graph code, and no
import of :mod:`cet_onnx.quant.quantizer` (which imports this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from cet_onnx.quant.quantizer import QuantizedWeight, WeightFormat

#: how a weight's codes are laid out in the file (:func:`stored_form`)
StoredForm = Literal["qdq", "nbits", "int8"]


def container_bits(bits: int) -> int:
    """Bits of the smallest packed ONNX integer type holding ``bits``-bit codes (2, 4 or 8)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bit-width must be between 2 and 8, got {bits}")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def packed_nbytes(count: int, cbits: int) -> int:
    """Bytes used by ``count`` values packed ``8 // cbits`` per byte (rounded up)."""
    per_byte = 8 // cbits
    return -(-count // per_byte)


def stored_form(qw: QuantizedWeight, form: StoredForm = "qdq"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None, int | None, bool]:
    """(codes, scale, zero_point, axis, block_size, needs_reshape) exactly as written to the model.

    INT2 weights use DequantizeLinear's blocked form: onnxruntime's QDQ selectors
    exclude 4- and 16-bit weights but not 2-bit ones, fuse INT2 weights into QLinearConv /
    QLinearMatMul and then refuse to load the model; blocked scales are never fused. A
    per-channel (or per-tensor) scale becomes one block spanning the whole reduction axis;
    a Conv kernel ``[O, I, k...]`` is stored as ``[O, I·k...]`` and reshaped back after
    dequantization so that its scales are not repeated per kernel position.
    ``form="nbits"`` (a MatMul weight that runs as ``MatMulNBits``, with no activation Q/DQ for
    those selectors to match) keeps the per-channel form: ``MatMulNBits`` takes it for any reduction
    length, a whole-axis block only when that length is a power of two. Bytes are the same either way.
    A 2-D INT2 weight whose output channels are not a multiple of 4 is then reshaped to its own shape after
    dequantization (``needs_reshape``): onnxruntime 1.32's 2-bit ``MatMulNBits`` computes wrong results
    for such an N (see :mod:`cet_onnx.graph.passes.matmul_nbits_form`) and does not fuse through a Reshape.

    ``form="int8"`` (codes widened to INT8 by a Cast before their DequantizeLinear, for onnxruntime's INT8
    kernels: :mod:`cet_onnx.graph.passes.weight_qdq`; per-channel or per-tensor weights only) stores the
    bytes of the ``"qdq"`` form, so sizes do not depend on the form: the same codes (a Conv kernel flattened,
    ``needs_reshape`` then restores the shape *before* dequantization, where onnxruntime folds it) and the
    same per-channel scales and zero points, 1-D along ``axis`` = the channel axis.
    """
    if container_bits(qw.fmt.bits) != 2:
        return qw.q, qw.scale, qw.zero_point, qw.axis, qw.block_size, False
    if form == "int8" and qw.block_size is None:
        q, scale, zp, _, _, reshape = stored_form(qw, "qdq")
        return q, scale.reshape(-1), zp.reshape(-1), qw.channel_axis, None, reshape
    guard = qw.q.ndim == 2 and qw.q.shape[qw.channel_axis] % 4 != 0
    if qw.block_size is not None or form == "nbits":
        return qw.q, qw.scale, qw.zero_point, qw.axis, qw.block_size, guard
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
    return q, scale.astype(np.float32), zp.astype(np.int8), r, q.shape[r], guard


def stored_nbytes(qw: QuantizedWeight) -> int:
    """Bytes of codes, float32 scales and zero points as :func:`stored_form` writes them."""
    cbits = container_bits(qw.fmt.bits)
    _, scale, _, _, _, reshape = stored_form(qw)
    nscale = int(np.prod(np.shape(scale), dtype=np.int64))
    extra = 8 * qw.q.ndim if reshape else 0  # the int64 target shape of the Reshape
    return packed_nbytes(qw.q.size, cbits) + 4 * nscale + packed_nbytes(nscale, cbits) + extra


@dataclass
class _Layout:
    """The fields of a ``QuantizedWeight`` that sizes depend on (codes and parameters as zeros)."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    block_size: int | None
    fmt: WeightFormat
    channel_axis: int
    reduction_axis: int


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
    layout = _Layout(q=np.zeros(shape, np.int8), scale=np.ones(scale_shape, np.float32),
                     zero_point=np.zeros(scale_shape, np.int8), axis=axis, block_size=block, fmt=fmt,
                     channel_axis=c, reduction_axis=r)
    return stored_nbytes(layout)  # type: ignore[arg-type]


def gather_format_ok(fmt: WeightFormat, row_length: int) -> bool:
    """Whether an embedding table ``[rows, row_length]`` in ``fmt`` has a fast lookup form: INT8 per row
    or per tensor (symmetric), or INT4 in blocks of a power of two ≥ 16 along the row
    (:mod:`cet_onnx.graph.passes.gather_rows` writes them)."""
    bits = container_bits(fmt.bits)
    if bits == 8:
        return fmt.granularity in ("channel", "tensor") and fmt.symmetric
    if bits == 4 and fmt.granularity == "block":
        b = fmt.block_size or 0
        return b >= 16 and b & (b - 1) == 0 and row_length % b == 0
    return False
