"""Pack integer codes into the bytes of ONNX INT2 / INT4 / INT8 tensors, and unpack them again.

ONNX stores INT4 two values per byte and INT2 four per byte, the first element in the
lowest bits; a tensor with an odd count pads the last byte with zeros. Packing here is
vectorised numpy (the bytes become a tensor's ``raw_data``, see :mod:`cet_onnx.graph.tensors`),
so multi-GB weights pack quickly.
"""

from __future__ import annotations

import numpy as np


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
