"""On-disk cache of probe results, keyed by model hash + data hash + settings.

``quantize`` at a new budget then skips the probes. Entries are JSON (never pickle), written
atomically; a corrupt entry is ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.io.atomic import write_atomic
from cet_onnx.io.external_data import data_digest


def default_dir() -> Path:
    """``$CET_ONNX_CACHE``, else ``$XDG_CACHE_HOME/cet-onnx``, else ``~/.cache/cet-onnx``."""
    if os.environ.get("CET_ONNX_CACHE"):
        return Path(os.environ["CET_ONNX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cet-onnx"


def cache_key(model: ir.Model, batches: Sequence[dict[str, np.ndarray]], settings: dict[str, Any],
              labels: np.ndarray | None = None) -> str:
    """SHA-256 over the serialized model (and the bytes of weights it keeps on disk), every batch and the settings."""
    h = hashlib.sha256()
    h.update(ir.to_proto(model).SerializeToString(deterministic=True))
    h.update(data_digest(model))
    for feed in batches:
        for name in sorted(feed):
            arr = np.ascontiguousarray(feed[name])
            h.update(name.encode())
            h.update(str(arr.dtype).encode() + str(arr.shape).encode())
            h.update(arr.tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels).tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def load(cache_dir: Path, key: str) -> dict[str, Any] | None:
    path = cache_dir / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store(cache_dir: Path, key: str, entry: dict[str, Any]) -> None:
    """Write atomically; an unwritable cache only costs a re-probe next time."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_dir / f"{key}.json", json.dumps(entry, sort_keys=True, default=_json_default))
    except OSError:
        pass


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
