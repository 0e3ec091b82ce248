#!/usr/bin/env python
"""Labelled inputs for Magika's file-type classifier (``standard_v3_3/model.onnx`` in PyPI's ``magika`` wheel).

Magika is a real production classifier built from Dense + GELU (tanh form) + LayerNorm blocks over the
bytes of a file: a model of the kind static 8-bit activations destroy. The model is fetched at run time
(``pip download --no-deps magika``) into ``tools/results/cache/`` (git-ignored) and never committed.

Features follow the wheel's extraction (``Magika._extract_features_from_seekable``, v1.0.3, read not
copied): read at most ``block_size`` (4096) bytes from the start and from the end of the file; strip
leading whitespace from the first block and trailing whitespace from the last; the first ``beg_size``
(1024) bytes of the first and the last ``end_size`` (1024) bytes of the last, padded with the padding
token (256) at the end / start; the model reads ``beg + end`` as 2048 int32. Files shorter than
``min_file_size_for_dl`` (8 bytes) are skipped, as the wheel does not run the model on them.

Files: real files on this machine, in the standard library and site-packages of the Python that runs
this script (source, bytecode, shared libraries, data, docs, licences of the installed packages; which
files depends on what is installed), labelled by their suffix
where the suffix names one of the model's content types unambiguously (:data:`SUFFIX_LABEL`). Sorted by
path, at most :data:`PER_LABEL` per label, split into calibration and evaluation by a hash of the path:
the two sets share no file.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np

from wheel_models import fetch_wheel_member

MODEL_MEMBER = "magika/models/standard_v3_3/model.onnx"
CONFIG_MEMBER = "magika/models/standard_v3_3/config.min.json"
SUFFIX_LABEL = {".py": "python", ".pyi": "python", ".pyc": "pythonbytecode", ".so": "elf", ".json": "json",
                ".md": "markdown", ".rst": "rst", ".txt": "txt", ".html": "html", ".css": "css",
                ".js": "javascript", ".c": "c", ".h": "c", ".cpp": "cpp", ".toml": "toml", ".yaml": "yaml",
                ".yml": "yaml", ".xml": "xml", ".png": "png", ".jpg": "jpeg", ".svg": "svg", ".gz": "gzip",
                ".zip": "zip", ".sh": "shell", ".ini": "ini", ".cfg": "ini", ".csv": "csv", ".pem": "pem",
                ".pyx": "python", ".tex": "latex", ".npy": "npy", ".npz": "npz", ".onnx": "onnx", ".ttf": "ttf"}
PER_LABEL = 60
MIN_SIZE = 8


def features(path: Path, cfg: dict) -> np.ndarray:
    """The model's 2048 int32 input for one file (beginning then end bytes, stripped and padded)."""
    size = path.stat().st_size
    n = min(cfg["block_size"], size)
    with open(path, "rb") as f:
        first = f.read(n)
        f.seek(size - n)
        last = f.read(n)
    beg = list(first.lstrip()[: cfg["beg_size"]])
    end = list(last.rstrip()[-cfg["end_size"]:]) if cfg["end_size"] else []
    pad = cfg["padding_token"]
    beg = beg + [pad] * (cfg["beg_size"] - len(beg))
    end = [pad] * (cfg["end_size"] - len(end)) + end
    return np.asarray(beg + end, dtype=np.int32)


def collect_files(roots: list[Path]) -> dict[str, list[Path]]:
    """Files under ``roots`` grouped by label, sorted by path, at most :data:`PER_LABEL` each."""
    by_label: dict[str, list[Path]] = {}
    for p in sorted({f for r in roots for f in r.rglob("*")}):
        label = SUFFIX_LABEL.get(p.suffix.lower())
        if label is None or not p.is_file() or p.is_symlink() or p.stat().st_size < MIN_SIZE:
            continue
        group = by_label.setdefault(label, [])
        if len(group) < 4 * PER_LABEL:
            group.append(p)
    return {k: _spread(v, PER_LABEL) for k, v in by_label.items()}


def _spread(paths: list[Path], n: int) -> list[Path]:
    """``n`` paths evenly spread over the sorted list (not the first ``n`` of one package)."""
    if len(paths) <= n:
        return paths
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def in_calibration(path: Path) -> bool:
    """A fixed third of the files calibrate, decided by a hash of the path."""
    return hashlib.sha256(str(path).encode()).digest()[0] % 3 == 0


def build(cache: Path) -> dict:
    """Fetch the model, build calibration / evaluation arrays once, return their paths and labels."""
    cache = Path(cache)
    model, info = fetch_wheel_member("magika", "magika-*.whl", MODEL_MEMBER, "magika_standard_v3_3.onnx", cache)
    cfg_path, _ = fetch_wheel_member("magika", "magika-*.whl", CONFIG_MEMBER, "magika_standard_v3_3.config.json", cache)
    cfg = json.loads(cfg_path.read_text())
    out = cache / "magika_data.npz"
    if not out.is_file():
        roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")})
        labels = cfg["target_labels_space"]
        rows = [(p, labels.index(lab)) for lab, ps in sorted(collect_files(roots).items()) for p in ps]
        x = np.stack([features(p, cfg) for p, _ in rows])
        y = np.array([lab for _, lab in rows], dtype=np.int64)
        cal = np.array([in_calibration(p) for p, _ in rows])
        np.savez(out, x_calib=x[cal], y_calib=y[cal], x_eval=x[~cal], y_eval=y[~cal],
                 paths_eval=np.array([str(p) for (p, _), c in zip(rows, cal) if not c]))
    return {"model": model, "model_info": info, "data": out, "labels": cfg["target_labels_space"],
            "input_name": "bytes"}


if __name__ == "__main__":
    info = build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "cache")
    d = np.load(info["data"])
    print(info["model"], d["x_calib"].shape, d["x_eval"].shape)
