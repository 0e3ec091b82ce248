"""Atomic writes: files are written to a hidden temporary folder beside their targets, then renamed into place.

An interrupted run therefore never leaves a half-written file under a target's name. This is
the one place cet-onnx writes files that way (models, reports, analysis tables, probe cache).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence


class Staging:
    """A hidden temporary folder in ``parent``; :meth:`commit` renames staged files into ``parent``."""

    def __init__(self, parent: str | os.PathLike, name: str) -> None:
        self.parent = Path(parent)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.parent))

    def commit(self, names: Sequence[str]) -> None:
        """Rename each staged file into place, in the order given (the one whose presence means 'done' last)."""
        for name in names:
            os.replace(self.folder / name, self.parent / name)

    def discard(self) -> None:
        """Remove the folder and whatever was not committed."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> bool:
        self.discard()
        return False


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write one file atomically (text as UTF-8); ``OSError`` propagates."""
    path = Path(path)
    with Staging(path.parent, path.name) as staging:
        (staging.folder / path.name).write_bytes(data.encode() if isinstance(data, str) else data)
        staging.commit([path.name])
