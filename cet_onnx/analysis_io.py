"""Write ``cet-onnx analyze`` results: a JSON document and a flat CSV table (atomically)."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from cet_onnx.errors import RuntimeFailure
from cet_onnx.io.atomic import write_atomic

CSV_FIELDS = ("allocator", "name", "op", "params", "format", "bytes", "first_order", "curvature", "predicted", "form")


def sensitivity_csv(result: dict[str, Any]) -> str:
    """One row per allocator × weight × format."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for allocator in ("cet", "hawq", "sqnr"):
        for row in result.get(allocator, []):
            for fmt, d in row["formats"].items():
                writer.writerow({"allocator": allocator, "name": row["name"], "op": row["op"],
                                 "params": row["params"], "format": fmt, **d})
    return buf.getvalue()


def sensitivity_ranking(result: dict[str, Any], allocators: tuple[str, ...]) -> tuple[str, list[dict[str, Any]]]:
    """(the lowest-bit format, the weights that have it, most sensitive first) from cet's table, else the first's."""
    rows = result.get("cet") or result[allocators[0]]
    lowest = min(result["formats"], key=lambda f: int(re.match(r"int(\d+)", f).group(1)))
    ranked = sorted((r for r in rows if lowest in r["formats"]), key=lambda r: r["formats"][lowest]["predicted"],
                    reverse=True)
    return lowest, ranked


def write_analysis(result: dict[str, Any], prefix: str) -> list[Path]:
    """``PREFIX.json`` and ``PREFIX.csv``."""
    from cet_onnx.report import strict_json
    base = Path(prefix)
    if not base.parent.is_dir():
        raise RuntimeFailure(f"{prefix}: output folder '{base.parent}' does not exist")
    paths = [base.with_name(base.name + ".json"), base.with_name(base.name + ".csv")]
    write_atomic(paths[0], json.dumps(strict_json(result), indent=2))
    write_atomic(paths[1], sensitivity_csv(result))
    return paths
