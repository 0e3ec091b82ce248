"""Pure-numpy quantizers: weight formats, scales, rounding, dequantization, activation parameters.

No graph code lives here: arrays in, arrays out. The rewriter turns the results into
ONNX initializers, and later stages (curvature probes, Hessian-aware rounding) call the
same functions, so the error they measure is exactly the error that is emitted.

Conventions, matching ONNX ``DequantizeLinear``:

* weights are symmetric, ``w ≈ scale * q`` with ``q`` in ``[-(2^(b-1)-1), 2^(b-1)-1]``
  and zero point 0; a bit-width ``b`` is stored in the smallest ONNX integer type that
  holds it (INT2, INT4 or INT8), so 3 bits live in an INT4 container;
* granularity ``tensor`` has one scale, ``channel`` one scale per output channel
  (``axis`` = the channel axis) and ``block`` one scale per output channel and block of
  ``block_size`` consecutive elements along the reduction axis (``axis`` = the reduction
  axis, the scale has the weight's rank with that axis divided by the block size, rounded
  up — DequantizeLinear's blocked form, opset 21);
* activations are uint8 asymmetric by default, int8 symmetric as an option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

Granularity = Literal["tensor", "channel", "block"]

#: ``rounding(w, scale, qmin, qmax) -> q``: maps weights to integer codes. ``scale`` is
#: already broadcast to ``w``'s shape. Round-to-nearest is the default; a Hessian-aware
#: rounding can be plugged in with the same signature.
Rounding = Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]


def round_to_nearest(w: np.ndarray, scale: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Round ``w / scale`` to the nearest integer (ties to even, like QuantizeLinear) and clip."""
    return np.clip(np.rint(w / scale), qmin, qmax).astype(np.int8)


def container_bits(bits: int) -> int:
    """Bits of the smallest packed ONNX integer type holding ``bits``-bit codes (2, 4 or 8)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bit-width must be between 2 and 8, got {bits}")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def weight_qrange(bits: int) -> tuple[int, int]:
    """Symmetric integer range for ``bits``-bit weights, e.g. (-7, 7) for 4 bits."""
    container_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: bit-width and scale granularity."""

    bits: int
    granularity: Granularity = "channel"
    block_size: int | None = None

    def __post_init__(self) -> None:
        container_bits(self.bits)
        if self.granularity == "block":
            if not self.block_size or self.block_size < 2:
                raise ValueError("block granularity needs block_size >= 2")
        elif self.block_size is not None:
            raise ValueError("block_size is only valid with block granularity")

    @property
    def label(self) -> str:
        """Short name such as ``int4/ch`` or ``int3/b32``."""
        g = {"tensor": "t", "channel": "ch"}.get(self.granularity, f"b{self.block_size}")
        return f"int{self.bits}/{g}"


@dataclass
class QuantizedWeight:
    """Integer codes plus the parameters DequantizeLinear needs to reproduce the weight."""

    q: np.ndarray            # int8 codes, same shape as the weight (unpacked)
    scale: np.ndarray        # float32: shape () / (C,) / blocked shape
    axis: int | None         # DequantizeLinear axis (None for per-tensor)
    block_size: int | None   # DequantizeLinear block_size (None unless blocked)
    fmt: WeightFormat
    channel_axis: int = 0    # output-channel axis of the weight
    reduction_axis: int = 1  # axis blocks run along

    def dequantize(self) -> np.ndarray:
        """Float32 weight that DequantizeLinear computes from these codes."""
        return (self.q.astype(np.float32) * expand_scale(self.scale, self.q.shape, self.axis, self.block_size))

    def nbytes(self) -> int:
        """Stored bytes: packed codes + float32 scales + zero points in the code's container."""
        from .packing import stored_nbytes
        return stored_nbytes(self)


def packed_nbytes(count: int, cbits: int) -> int:
    """Bytes used by ``count`` values packed ``8 // cbits`` per byte (rounded up)."""
    per_byte = 8 // cbits
    return -(-count // per_byte)


def expand_scale(scale: np.ndarray, shape: tuple[int, ...], axis: int | None,
                 block_size: int | None) -> np.ndarray:
    """Broadcast a per-tensor / per-axis / blocked scale to a full array of ``shape``."""
    scale = np.asarray(scale, dtype=np.float32)
    if axis is None:
        return np.broadcast_to(scale, shape)
    if block_size is None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return np.broadcast_to(scale.reshape(view), shape)
    full = np.repeat(scale, block_size, axis=axis)
    return np.take(full, np.arange(shape[axis]), axis=axis)


def _blocked_absmax(w: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """Max |w| over blocks of ``block_size`` along ``axis`` (last block may be short)."""
    n = w.shape[axis]
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    a = np.moveaxis(np.abs(w), axis, -1)
    if pad:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), a.dtype)], axis=-1)
    a = a.reshape(a.shape[:-1] + (nblocks, block_size)).max(axis=-1)
    return np.moveaxis(a, -1, axis)


def absmax(w: np.ndarray, fmt: WeightFormat, channel_axis: int, reduction_axis: int) -> tuple[np.ndarray, int | None]:
    """Per-group max |w| for the format's granularity, and the DequantizeLinear axis."""
    w = np.asarray(w, dtype=np.float32)
    if fmt.granularity == "tensor":
        return np.asarray(np.abs(w).max() if w.size else 0.0, dtype=np.float32), None
    if fmt.granularity == "channel":
        axes = tuple(i for i in range(w.ndim) if i != channel_axis % w.ndim)
        return np.abs(w).max(axis=axes).astype(np.float32), channel_axis % w.ndim
    assert fmt.block_size is not None
    return _blocked_absmax(w, reduction_axis % w.ndim, fmt.block_size).astype(np.float32), reduction_axis % w.ndim


def scale_from_absmax(amax: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric scale ``amax / qmax``; groups that are all zero get scale 1 (their codes are 0)."""
    _, qmax = weight_qrange(bits)
    amax = np.asarray(amax, dtype=np.float32)
    scale = amax / np.float32(qmax)
    tiny = np.finfo(np.float32).tiny
    return np.where(scale > tiny, scale, np.float32(1.0)).astype(np.float32)


def quantize_weight(w: np.ndarray, fmt: WeightFormat, channel_axis: int = 0, reduction_axis: int = 1,
                    rounding: Rounding = round_to_nearest, clip_ratio: np.ndarray | float = 1.0) -> QuantizedWeight:
    """Quantize a float weight to ``fmt``.

    ``channel_axis`` is the output-channel axis (per-channel scales), ``reduction_axis`` the
    input-channel axis that blocks run along. ``clip_ratio`` (<= 1, scalar or shaped like the
    scales) shrinks the range, for clipping searches.
    """
    w = np.asarray(w, dtype=np.float32)
    amax, axis = absmax(w, fmt, channel_axis, reduction_axis)
    scale = scale_from_absmax(amax * np.asarray(clip_ratio, dtype=np.float32), fmt.bits)
    block = fmt.block_size if fmt.granularity == "block" else None
    qmin, qmax = weight_qrange(fmt.bits)
    q = rounding(w, expand_scale(scale, w.shape, axis, block), qmin, qmax)
    return QuantizedWeight(q=np.asarray(q, dtype=np.int8), scale=scale, axis=axis, block_size=block, fmt=fmt,
                           channel_axis=channel_axis % w.ndim, reduction_axis=reduction_axis % w.ndim)


def fake_quantize(w: np.ndarray, fmt: WeightFormat, channel_axis: int = 0, reduction_axis: int = 1,
                  rounding: Rounding = round_to_nearest) -> np.ndarray:
    """``Q_b(w)``: the float weight the emitted model will compute with."""
    return quantize_weight(w, fmt, channel_axis, reduction_axis, rounding).dequantize()


@dataclass(frozen=True)
class ActivationParams:
    """QuantizeLinear parameters of one activation tensor."""

    scale: float
    zero_point: int
    dtype: np.dtype


def activation_params(lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> ActivationParams:
    """Scale and zero point covering ``[lo, hi]`` (which must contain 0).

    Asymmetric uses unsigned codes ``[0, 2^b-1]``; symmetric uses signed codes with zero
    point 0 and range ``[-(2^(b-1)-1), 2^(b-1)-1]`` scaled by ``max(|lo|, |hi|)``.
    """
    if bits not in (8, 16):
        raise ValueError(f"activation bit-width must be 8 or 16, got {bits}")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    tiny = float(np.finfo(np.float32).tiny)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = max(-lo, hi)
        scale = amax / qmax if amax / qmax > tiny else 1.0
        return ActivationParams(float(np.float32(scale)), 0, np.dtype(np.int8 if bits == 8 else np.int16))
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax if (hi - lo) / qmax > tiny else 1.0
    scale = float(np.float32(scale))
    zp = int(np.clip(np.rint(-lo / scale), 0, qmax))
    return ActivationParams(scale, zp, np.dtype(np.uint8 if bits == 8 else np.uint16))


def quantize_activation(x: np.ndarray, p: ActivationParams) -> np.ndarray:
    """QuantizeLinear followed by DequantizeLinear, in numpy (for tests and probes)."""
    info = np.iinfo(p.dtype)
    q = np.clip(np.rint(x / np.float32(p.scale)) + p.zero_point, info.min, info.max)
    return ((q - p.zero_point) * np.float32(p.scale)).astype(np.float32)
