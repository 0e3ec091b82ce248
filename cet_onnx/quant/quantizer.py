"""Pure-numpy quantizers: weight formats, scales, rounding, dequantization, activation parameters.

No graph code lives here: arrays in, arrays out. The graph passes turn the results into
ONNX initializers, and later stages (curvature probes, Hessian-aware rounding) call the
same functions, so the error they measure is exactly the error that is emitted.

Conventions, matching ONNX ``DequantizeLinear`` (``w ≈ (q − zero_point) · scale``):

* a bit-width ``b`` is stored in the smallest ONNX integer type that holds it (INT2, INT4 or
  INT8), so 3 bits live in an INT4 container;
* *symmetric* weights have zero point 0 and codes in ``[-(2^(b-1)-1), 2^(b-1)-1]``;
  *asymmetric* weights use all ``2^b`` codes ``[-2^(b-1), 2^(b-1)-1]`` over ``[min, max]`` of the
  group (always containing 0) with an integer zero point — at 2 bits that is four levels
  instead of three, at no extra storage since a zero point is stored either way;
* granularity ``tensor`` has one scale, ``channel`` one scale per output channel
  (``axis`` = the channel axis) and ``block`` one scale per output channel and block of
  ``block_size`` consecutive elements along the reduction axis (``axis`` = the reduction
  axis, the scale has the weight's rank with that axis divided by the block size, rounded
  up — DequantizeLinear's blocked form, opset 21);
* activations are uint8 asymmetric by default, int8 symmetric as an option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from cet_onnx.quant.sizes import container_bits, stored_nbytes

Granularity = Literal["tensor", "channel", "block"]

#: ``rounding(w, scale, zero_point, qmin, qmax) -> q``: maps weights to integer codes.
#: ``scale`` and ``zero_point`` are already broadcast to ``w``'s shape. Round-to-nearest is
#: the default; a Hessian-aware rounding can be plugged in with the same signature.
Rounding = Callable[[np.ndarray, np.ndarray, np.ndarray, int, int], np.ndarray]


def round_to_nearest(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Round ``w / scale + zero_point`` to the nearest integer (ties to even, like QuantizeLinear) and clip."""
    return np.clip(np.rint(w / scale) + zero_point, qmin, qmax).astype(np.int8)


def weight_qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Integer code range, e.g. (-7, 7) for symmetric and (-8, 7) for asymmetric 4 bits."""
    container_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if symmetric else -qmax - 1), qmax


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: bit-width, scale granularity and grid."""

    bits: int
    granularity: Granularity = "channel"
    block_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        container_bits(self.bits)
        if self.granularity == "block":
            if not self.block_size or self.block_size < 2:
                raise ValueError("block granularity needs block_size >= 2")
        elif self.block_size is not None:
            raise ValueError("block_size is only valid with block granularity")

    @property
    def label(self) -> str:
        """Short name such as ``int4/ch``, ``int3/b32`` or ``int2a/ch`` (``a``: asymmetric)."""
        g = {"tensor": "t", "channel": "ch"}.get(self.granularity, f"b{self.block_size}")
        return f"int{self.bits}{'' if self.symmetric else 'a'}/{g}"


@dataclass
class QuantizedWeight:
    """Integer codes plus the parameters DequantizeLinear needs to reproduce the weight."""

    q: np.ndarray            # int8 codes, same shape as the weight (unpacked)
    scale: np.ndarray        # float32: shape () / (C,) / blocked shape
    zero_point: np.ndarray   # int8, same shape as scale (zeros when symmetric)
    axis: int | None         # DequantizeLinear axis (None for per-tensor)
    block_size: int | None   # DequantizeLinear block_size (None unless blocked)
    fmt: WeightFormat
    channel_axis: int = 0    # output-channel axis of the weight
    reduction_axis: int = 1  # axis blocks run along

    def dequantize(self) -> np.ndarray:
        """Float32 weight that DequantizeLinear computes from these codes, ``(q − zero_point) · scale``.

        Computed in place in the one float32 result (blocks a slice at a time), so a weight
        costs no more than its float32 bytes while it is dequantized."""
        out = self.q.astype(np.float32)
        zp = self.zero_point.astype(np.float32)
        if self.axis is None or self.block_size is None:
            out -= expand_scale(zp, out.shape, self.axis, None)
            out *= expand_scale(self.scale, out.shape, self.axis, None)
            return out
        o, z, sc, b = np.moveaxis(out, self.axis, 0), np.moveaxis(zp, self.axis, 0), \
            np.moveaxis(np.asarray(self.scale), self.axis, 0), self.block_size
        for k in range(z.shape[0]):
            o[k * b:(k + 1) * b] -= z[k]
            o[k * b:(k + 1) * b] *= sc[k]
        return out

    def nbytes(self) -> int:
        """Stored bytes: packed codes + float32 scales + zero points in the code's container."""
        return stored_nbytes(self)

    def transposed(self) -> QuantizedWeight:
        """The same 2-D weight transposed, exactly: codes and every parameter array transposed, axes swapped
        (a Gemm ``B [N, K]`` with ``transB=1`` rewritten as a MatMul weight ``[K, N]``)."""
        if self.q.ndim != 2:
            raise ValueError(f"only a 2-D weight can be transposed, got shape {self.q.shape}")

        def flip(p: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.asarray(p).T) if np.ndim(p) == 2 else np.asarray(p)

        return QuantizedWeight(q=np.ascontiguousarray(self.q.T), scale=flip(self.scale), zero_point=flip(self.zero_point),
                               axis=None if self.axis is None else 1 - self.axis, block_size=self.block_size,
                               fmt=self.fmt, channel_axis=1 - self.channel_axis, reduction_axis=1 - self.reduction_axis)


def expand_scale(scale: np.ndarray, shape: tuple[int, ...], axis: int | None,
                 block_size: int | None) -> np.ndarray:
    """Broadcast a per-tensor / per-axis / blocked parameter to a full array of ``shape``."""
    scale = np.asarray(scale)
    if axis is None:
        return np.broadcast_to(scale, shape)
    if block_size is None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return np.broadcast_to(scale.reshape(view), shape)
    full = np.repeat(scale, block_size, axis=axis)
    cut = [slice(None)] * full.ndim
    cut[axis] = slice(0, shape[axis])
    return full[tuple(cut)]


def _blocked_reduce(a: np.ndarray, axis: int, block_size: int, op) -> np.ndarray:
    """``op`` over blocks of ``block_size`` along ``axis`` (a short last block is zero-padded)."""
    n = a.shape[axis]
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    a = np.moveaxis(a, axis, -1)
    if pad:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), a.dtype)], axis=-1)
    a = op(a.reshape(a.shape[:-1] + (nblocks, block_size)), axis=-1)
    return np.moveaxis(a, -1, axis)


def reduce_groups(a: np.ndarray, fmt: WeightFormat, channel_axis: int, reduction_axis: int,
                  op=np.max) -> tuple[np.ndarray, int | None]:
    """``op`` over each scale group (tensor / channel / block) of ``a``, and the DequantizeLinear axis."""
    if fmt.granularity == "tensor":
        return np.asarray(op(a) if a.size else 0.0, dtype=np.float32), None
    if fmt.granularity == "channel":
        c = channel_axis % a.ndim
        return op(a, axis=tuple(i for i in range(a.ndim) if i != c)).astype(np.float32), c
    assert fmt.block_size is not None
    r = reduction_axis % a.ndim
    return _blocked_reduce(a, r, fmt.block_size, op).astype(np.float32), r


def _positive(scale: np.ndarray) -> np.ndarray:
    tiny = np.finfo(np.float32).tiny
    return np.where(scale > tiny, scale, np.float32(1.0)).astype(np.float32)


def scale_from_absmax(amax: np.ndarray, bits: int) -> np.ndarray:
    """Symmetric scale ``amax / qmax``; groups that are all zero get scale 1 (their codes are 0)."""
    _, qmax = weight_qrange(bits)
    return _positive(np.asarray(amax, dtype=np.float32) / np.float32(qmax))


def params_from_range(lo: np.ndarray, hi: np.ndarray, fmt: WeightFormat,
                      clip_ratio: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero_point) of groups whose values span ``[lo, hi]`` (``lo ≤ 0 ≤ hi``), range shrunk by ``clip_ratio``."""
    ratio = np.asarray(clip_ratio, dtype=np.float32)
    lo, hi = np.asarray(lo, dtype=np.float32), np.asarray(hi, dtype=np.float32)
    if fmt.symmetric:
        scale = scale_from_absmax(np.maximum(-lo, hi) * ratio, fmt.bits)
        return scale, np.zeros(scale.shape, np.int8)
    qmin, qmax = weight_qrange(fmt.bits, symmetric=False)
    lo, hi = lo.astype(np.float64) * ratio, hi.astype(np.float64) * ratio   # float64: hi − lo can exceed float32
    scale = (hi - lo) / (qmax - qmin)
    zp = np.clip(np.rint(qmin - lo / np.where(scale > 0, scale, 1.0)), qmin, qmax)
    # keep every grid point (q − zp)·scale finite in float32
    reach = np.maximum(np.abs(qmin - zp), np.abs(qmax - zp))
    scale = np.minimum(scale, float(np.finfo(np.float32).max) / reach)
    return _positive(scale.astype(np.float32)), zp.astype(np.int8)


def group_params(w: np.ndarray, fmt: WeightFormat, channel_axis: int, reduction_axis: int,
                 clip_ratio: np.ndarray | float = 1.0) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(scale, zero_point, axis) of every group, with its range shrunk by ``clip_ratio``."""
    lo, axis = reduce_groups(np.minimum(w, 0), fmt, channel_axis, reduction_axis, np.min)
    hi, _ = reduce_groups(np.maximum(w, 0), fmt, channel_axis, reduction_axis, np.max)
    scale, zp = params_from_range(lo, hi, fmt, clip_ratio)
    return scale, zp, axis


def _group_rows(w: np.ndarray, fmt: WeightFormat, channel_axis: int, reduction_axis: int):
    """``w`` with each scale group along the last axis (short blocks zero-padded), and a function that
    moves per-group results from that layout to :func:`reduce_groups`'s."""
    if fmt.granularity == "tensor":
        return w.reshape(1, -1), lambda g: g.reshape(())
    if fmt.granularity == "channel":
        c = channel_axis % w.ndim
        return np.moveaxis(w, c, 0).reshape(w.shape[c], -1), lambda g: g
    r = reduction_axis % w.ndim
    bs = fmt.block_size
    a = np.moveaxis(w, r, -1)
    nblocks = -(-a.shape[-1] // bs)
    pad = nblocks * bs - a.shape[-1]
    if pad:
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), a.dtype)], axis=-1)
    return a.reshape(a.shape[:-1] + (nblocks, bs)), lambda g: np.moveaxis(g, -1, r)


def mse_clip_ratios(w: np.ndarray, fmt: WeightFormat, channel_axis: int = 0, reduction_axis: int = 1,
                    grid: np.ndarray | None = None) -> np.ndarray:
    """Per-group clipping ratio (of the group's range) that minimises the squared round-to-nearest error.

    At low bit-widths clipping a few outliers buys a finer step for all other weights; the
    search tries each ratio of ``grid`` (default 0.40 … 1.00) for every group at once, on a
    layout with one group per row so that scales broadcast without being expanded.
    """
    w = np.asarray(w, dtype=np.float32)
    grid = np.linspace(0.4, 1.0, 25) if grid is None else np.asarray(grid, dtype=np.float32)
    qmin, qmax = weight_qrange(fmt.bits, fmt.symmetric)
    rows, to_groups = _group_rows(w, fmt, channel_axis, reduction_axis)
    rows = np.ascontiguousarray(rows)  # 25 passes follow: a strided view would make each one slow
    lo = np.minimum(rows.min(axis=-1, initial=0.0), 0)
    hi = np.maximum(rows.max(axis=-1, initial=0.0), 0)
    buf = np.empty(rows.shape, np.float32)
    best_err = best = None
    for r in grid:
        scale, zp = params_from_range(lo, hi, fmt, r)
        s, z = scale[..., None], zp.astype(np.float32)[..., None]
        np.divide(rows, s, out=buf)
        np.rint(buf, out=buf)
        buf += z
        np.clip(buf, qmin, qmax, out=buf)
        buf -= z
        buf *= s
        buf -= rows
        np.square(buf, out=buf)
        e = buf.sum(axis=-1)
        if best_err is None:
            best_err, best = e, np.full(e.shape, np.float32(r))
        else:
            better = e < best_err
            best_err = np.where(better, e, best_err)
            best = np.where(better, np.float32(r), best)
    return to_groups(best)


#: bits of the grid an 8-bit weight read by a u8 × s8 integer kernel gets (:func:`saturation_safe`)
SATURATION_SAFE_BITS = 7


def saturation_safe(fmt: WeightFormat) -> WeightFormat:
    """``fmt`` with codes within ±63 where it is 8-bit per channel / per tensor, else ``fmt``.

    x86 u8 × s8 kernels without VNNI add two products into a saturating int16: with uint8
    activations, codes within ±63 never saturate (2 · 255 · 63 < 2¹⁵), codes up to ±127 can
    (see :mod:`cet_onnx.graph.integer_kernels`). The codes still take one byte.
    """
    if fmt.bits != 8 or fmt.granularity == "block":
        return fmt
    return WeightFormat(SATURATION_SAFE_BITS, fmt.granularity, symmetric=True)


def quantize_weight(w: np.ndarray, fmt: WeightFormat, channel_axis: int = 0, reduction_axis: int = 1,
                    rounding: Rounding = round_to_nearest, clip_ratio: np.ndarray | float | str = 1.0,
                    integer_kernel: bool = False) -> QuantizedWeight:
    """Quantize a float weight to ``fmt``.

    ``channel_axis`` is the output-channel axis (per-channel scales), ``reduction_axis`` the
    input-channel axis that blocks run along. ``clip_ratio`` (<= 1, scalar or shaped like the
    scales) shrinks the range; ``"mse"`` searches the ratio per group (:func:`mse_clip_ratios`).
    ``integer_kernel``: the weight is read by a u8 × s8 integer kernel, so an 8-bit format takes
    :func:`saturation_safe` codes (the result's ``fmt`` says which).
    """
    if integer_kernel:
        fmt = saturation_safe(fmt)
    w = np.asarray(w, dtype=np.float32)
    if isinstance(clip_ratio, str):
        if clip_ratio != "mse":
            raise ValueError(f"clip_ratio must be a number or 'mse', got {clip_ratio!r}")
        clip_ratio = mse_clip_ratios(w, fmt, channel_axis, reduction_axis)
    scale, zp, axis = group_params(w, fmt, channel_axis, reduction_axis, clip_ratio)
    block = fmt.block_size if fmt.granularity == "block" else None
    qmin, qmax = weight_qrange(fmt.bits, fmt.symmetric)
    q = rounding(w, expand_scale(scale, w.shape, axis, block),
                 expand_scale(zp.astype(np.float32), w.shape, axis, block), qmin, qmax)
    return QuantizedWeight(q=np.asarray(q, dtype=np.int8), scale=scale, zero_point=zp, axis=axis, block_size=block,
                           fmt=fmt, channel_axis=channel_axis % w.ndim, reduction_axis=reduction_axis % w.ndim)


@dataclass
class RoundingPlan:
    """Which rounding each weight uses: its Hessian-aware rounding for formats up to ``max_bits``, else RTN."""

    roundings: dict[str, Rounding] = field(default_factory=dict)
    max_bits: int = 8

    def get(self, name: str, fmt: WeightFormat) -> Rounding:
        r = self.roundings.get(name)
        return r if r is not None and fmt.bits <= self.max_bits else round_to_nearest


CLIP_MODES = ("auto", "mse", "none")


def clip_for(fmt: WeightFormat, mode: str = "auto") -> str | float:
    """The ``clip_ratio`` argument for a clipping mode: ``auto`` searches at 4 bits and below."""
    if mode not in CLIP_MODES:
        raise ValueError(f"weight clipping must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
    if mode == "mse" or (mode == "auto" and fmt.bits <= 4):
        return "mse"
    return 1.0


GRIDS = ("auto", "symmetric", "asymmetric")


def grid_symmetric(bits: int, grid: str = "auto") -> bool:
    """Whether ``bits``-bit weights use the symmetric grid: ``auto`` is asymmetric at 4 bits and below.

    8-bit weights stay symmetric so that onnxruntime's QLinearConv / QLinearMatMul fusions apply
    at full speed; below that the extra code level is free accuracy: the zero point is subtracted from
    the codes when they are widened to INT8 at load (:mod:`cet_onnx.graph.passes.weight_qdq`).
    """
    if grid not in GRIDS:
        raise ValueError(f"weight grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    return grid == "symmetric" or (grid == "auto" and bits > 4)


@dataclass(frozen=True)
class ActivationParams:
    """QuantizeLinear parameters of one activation tensor."""

    scale: float
    zero_point: int
    dtype: np.dtype


#: activation bit-widths the emitted QuantizeLinear / DequantizeLinear pairs can carry
ACTIVATION_BITS = (8, 16)


def activation_params(lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> ActivationParams:
    """Scale and zero point covering ``[lo, hi]`` (which must contain 0).

    Asymmetric uses unsigned codes ``[0, 2^b-1]``; symmetric uses signed codes with zero
    point 0 and range ``[-(2^(b-1)-1), 2^(b-1)-1]`` scaled by ``max(|lo|, |hi|)``.
    """
    if bits not in ACTIVATION_BITS:
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
