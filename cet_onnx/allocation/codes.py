"""Where the candidate codes of every weight × format wait while the solver chooses: memory or disk.

Mixed precision quantizes each weight in every candidate format once (with major-axis rounding
that is the expensive step) and reads the results again for the probes, the closed loop, the
fidelity check and the emitted model. A small model keeps them in memory. For a model whose
weights stay on disk the int8 codes of six formats alone would be 1.5× its float32 weight bytes,
so there they go to a temporary folder (``TMPDIR``), one ``.npy`` file per weight × format, and
come back one at a time; scales and zero points, which are small, stay in memory.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from cet_onnx.quant.quantizer import QuantizedWeight

Key = tuple[int, int]   # (weight index, format index)


class CodeStore:
    """``QuantizedWeight`` per (weight, format): kept as given, or with the codes written to disk."""

    def __init__(self, on_disk: bool = False) -> None:
        self._items: dict[Key, QuantizedWeight] = {}
        self._dir = tempfile.TemporaryDirectory(prefix="cet-onnx-codes-") if on_disk else None

    @property
    def on_disk(self) -> bool:
        return self._dir is not None

    def __contains__(self, key: Key) -> bool:
        return key in self._items

    def put(self, key: Key, qw: QuantizedWeight) -> None:
        if self._dir is None:
            self._items[key] = qw
            return
        np.save(self._path(key), qw.q, allow_pickle=False)
        self._items[key] = dataclasses.replace(qw, q=np.empty(0, dtype=qw.q.dtype))

    def get(self, key: Key) -> QuantizedWeight:
        """The stored weight (on disk: a fresh copy of the codes, released when the caller drops it)."""
        qw = self._items[key]
        if self._dir is None:
            return qw
        return dataclasses.replace(qw, q=np.load(self._path(key), allow_pickle=False))

    def close(self) -> None:
        """Delete the folder (also done when the store is garbage-collected)."""
        self._items.clear()
        if self._dir is not None:
            self._dir.cleanup()

    def _path(self, key: Key) -> Path:
        return Path(self._dir.name) / f"w{key[0]}_f{key[1]}.npy"
