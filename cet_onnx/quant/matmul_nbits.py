"""A ``[K, N]`` MatMul weight's codes in the layout of onnxruntime's ``com.microsoft.MatMulNBits``.

``MatMulNBits`` computes ``A @ W`` with ``W[k, n] = (u[n, k] − z[n, k // B]) · s[n, k // B]``:
unsigned codes ``u`` of ``bits`` bits (2, 4 or 8) in blocks of ``B`` along K (a power of two,
at least 16), stored ``[N, ceil(K / B), B · bits / 8]`` as bytes with the first code in the
lowest bits; scales ``[N · ceil(K / B)]``; zero points packed the same way along the blocks
(``[N · ceil(ceil(K / B) · bits / 8)]``), or absent when every one is ``2^(bits−1)``, the
kernel's default. cet-onnx's codes are signed (``q − zp`` with both in the signed range), so
both are shifted by ``2^(bits−1)``, which leaves every value as it was.

A per-channel (or per-tensor) weight takes the block size that stores it in the fewest bytes,
its scale repeated per block; codes past K in the last block are the zero point (value 0).
Pure numpy: arrays in, arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cet_onnx.quant.quantizer import QuantizedWeight
from cet_onnx.quant.sizes import container_bits

MIN_BLOCK = 16


@dataclass
class NBitsArrays:
    """The inputs and attributes of one ``MatMulNBits`` node."""

    b: np.ndarray                   # uint8 [N, blocks, B * bits / 8]
    scales: np.ndarray              # float32 [N * blocks]
    zero_points: np.ndarray | None  # uint8 packed, or None (all at the default)
    k: int
    n: int
    bits: int
    block_size: int

    def nbytes(self) -> int:
        return self.b.nbytes + self.scales.nbytes + (0 if self.zero_points is None else self.zero_points.nbytes)


def nbits_arrays(qw: QuantizedWeight) -> NBitsArrays:
    """``qw`` (a 2-D weight ``[K, N]``: channel axis 1, blocks along axis 0) as ``MatMulNBits`` arrays."""
    if qw.q.ndim != 2 or qw.channel_axis != 1:
        raise ValueError(f"MatMulNBits takes a [K, N] weight with channels on axis 1, got shape {qw.q.shape}, "
                         f"channel axis {qw.channel_axis}")
    bits = container_bits(qw.fmt.bits)
    k, n = qw.q.shape
    block = qw.block_size if qw.block_size is not None else _cheapest_block(k, bits)
    if block < MIN_BLOCK or block & (block - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block size of at least {MIN_BLOCK}, got {block}")
    blocks = -(-k // block)
    scale, zp = _per_block(qw, blocks, block)                  # [N, blocks] each
    shift = 1 << (bits - 1)
    zp_u = (zp.astype(np.int16) + shift).astype(np.uint8)
    u = np.repeat(zp_u, block, axis=1)                          # padding past K dequantizes to 0
    u[:, :k] = (qw.q.T.astype(np.int16) + shift).astype(np.uint8)
    if u.max(initial=0) >= 1 << bits:
        raise ValueError(f"codes out of the {bits}-bit range")
    b = pack_low_first(u.reshape(n, blocks, block), bits)
    zero_points = None if np.all(zp_u == shift) else pack_low_first(_pad_to_bytes(zp_u, bits, shift), bits).reshape(-1)
    return NBitsArrays(b, np.ascontiguousarray(scale, np.float32).reshape(-1), zero_points, k, n, bits, block)


def pack_low_first(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit values along the last axis into bytes, the first value in the lowest bits."""
    per = 8 // bits
    if u.shape[-1] % per:
        raise ValueError(f"the last axis ({u.shape[-1]}) is not a multiple of {per}")
    g = u.astype(np.uint8).reshape(*u.shape[:-1], -1, per)
    out = np.zeros(g.shape[:-1], np.uint8)
    for i in range(per):
        out |= g[..., i] << (i * bits)
    return out


def _pad_to_bytes(zp: np.ndarray, bits: int, fill: int) -> np.ndarray:
    per = 8 // bits
    pad = -zp.shape[1] % per
    return np.pad(zp, ((0, 0), (0, pad)), constant_values=fill) if pad else zp


def _per_block(qw: QuantizedWeight, blocks: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per output channel and block, ``[N, blocks]``."""
    n = qw.q.shape[1]
    if qw.block_size is not None:      # blocked along axis 0: [blocks, N]
        return np.asarray(qw.scale).T, np.asarray(qw.zero_point).T
    scale = np.broadcast_to(np.asarray(qw.scale, np.float32).reshape(-1), (n,))
    zp = np.broadcast_to(np.asarray(qw.zero_point).reshape(-1), (n,))
    return np.repeat(scale[:, None], blocks, 1), np.repeat(zp[:, None], blocks, 1)


def _cheapest_block(k: int, bits: int) -> int:
    """The power-of-two block (at least :data:`MIN_BLOCK`, at most one block over K) storing a per-channel
    weight of K codes in the fewest bytes per channel: padded codes plus a float32 scale per block."""
    sizes, block = {}, MIN_BLOCK
    while True:
        blocks = -(-k // block)
        sizes[block] = blocks * block * bits // 8 + 4 * blocks
        if block >= k:
            break
        block *= 2
    return min(sizes, key=lambda b: (sizes[b], -b))
