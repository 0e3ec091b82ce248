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


ACTIVATION_CSV_FIELDS = ("tensor", "precision", "method", "delta_loss", "quantizer_sqnr_db", "range_lo", "range_hi", "left_float")


def activation_csv(result: dict[str, Any]) -> str:
    """One row per activation point × precision, then one per point left float (with the reason)."""
    from cet_onnx.report import strict_json
    acts = result["activations"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ACTIVATION_CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in strict_json(acts["points"]):
        writer.writerow({**row, "range_lo": row["range"][0], "range_hi": row["range"][1]})
    for tensor, why in acts["left_float"].items():
        writer.writerow({"tensor": tensor, "precision": "float", "left_float": why})
    return buf.getvalue()


def activation_ranking(result: dict[str, Any], precision: str = "int8 static") -> list[dict[str, Any]]:
    """The points at ``precision`` with the ``--calib-method`` range, most sensitive first."""
    acts = result["activations"]
    return sorted((r for r in acts["points"] if r["precision"] == precision and r["method"] == acts["calib_method"]),
                  key=lambda r: r["delta_loss"], reverse=True)


def sensitivity_ranking(result: dict[str, Any], allocators: tuple[str, ...]) -> tuple[str, list[dict[str, Any]]]:
    """(the lowest-bit format, the weights that have it, most sensitive first) from cet's table, else the first's."""
    rows = result.get("cet") or result[allocators[0]]
    lowest = min(result["formats"], key=lambda f: int(re.match(r"int(\d+)", f).group(1)))
    ranked = sorted((r for r in rows if lowest in r["formats"]), key=lambda r: r["formats"][lowest]["predicted"],
                    reverse=True)
    return lowest, ranked


def write_analysis(result: dict[str, Any], prefix: str) -> list[Path]:
    """``PREFIX.json`` and ``PREFIX.csv`` (the weight table, or with ``activations`` the activation table)."""
    from cet_onnx.report import strict_json
    base = Path(prefix)
    if not base.parent.is_dir():
        raise RuntimeFailure(f"{prefix}: output folder '{base.parent}' does not exist")
    paths = [base.with_name(base.name + ".json"), base.with_name(base.name + ".csv")]
    write_atomic(paths[0], json.dumps(strict_json(result), indent=2))
    write_atomic(paths[1], activation_csv(result) if "activations" in result else sensitivity_csv(result))
    return paths
