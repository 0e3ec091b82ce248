"""Embedding tables: how often the calibration data looks up each row, and the quadratic form that gives.

A ``Gather`` over a table ``E`` ``[rows, hidden]`` outputs ``E[indices]``. A weight error ``δ`` moves
that output by ``δ[indices]``, so the layer-output error over the calibration data is
``Σ_r n_r ‖δ_r‖²`` with ``n_r`` the number of real tokens (padding excluded, where the indices are
laid out like the attention mask) that looked row ``r`` up. That is the Gather's counterpart of a
MatMul's ``tr(δ H δᵀ)`` with ``H = XᵀX`` (one-hot rows ``X``: a diagonal ``H`` of counts).

Fast probes scale one probe of the table to its other formats with it, as they do for MatMul weights
(:func:`cet_onnx.allocation.allocate.measure_cet_fast`); the table's rounding stays round-to-nearest.
Pure numpy apart from :func:`gather_indices`, which reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from cet_onnx.calibration import padding
from cet_onnx.graph.passes._graph import branch_nodes
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.quant.quantizer import round_to_nearest


def gather_indices(model: ir.Model, w: WeightInfo) -> str | None:
    """The indices tensor of the first ``Gather`` that looks rows of the 2-D table ``w`` up (axis 0), or None.

    A ``Cast`` of the table (a half-precision model fed as float32) is looked through.
    """
    if len(w.shape) != 2:
        return None
    target = w.name
    for node in branch_nodes(model.graph):
        names = [v.name if v is not None else "" for v in node.inputs]
        if node.op_type == "Cast" and names[:1] == [target]:
            target = node.outputs[0].name
        elif node.op_type == "Gather" and names[:1] == [target] and len(names) > 1:
            axis = node.attributes.get("axis")
            return names[1] if (0 if axis is None else axis.value) in (0, -2) else None
    return None


@dataclass
class RowCounts:
    """Lookups per row of one table, summed over the calibration batches."""

    rows: int
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.rows)

    def update(self, indices: np.ndarray, tokens: np.ndarray | None) -> None:
        """Count ``indices`` (negative ones wrap, as in ``Gather``), at the real tokens where they are laid out
        like the attention mask ``tokens``."""
        idx = np.asarray(padding.at_tokens(np.asarray(indices), tokens)).reshape(-1).astype(np.int64) % self.rows
        self.counts += np.bincount(idx, minlength=self.rows)

    @property
    def seen(self) -> int:
        return int(self.counts.sum())


def quadratic_error(delta: np.ndarray, counts: np.ndarray) -> float:
    """``Σ_r n_r ‖δ_r‖²`` of a table error ``delta`` ``[rows, hidden]`` (float64)."""
    d = np.asarray(delta, dtype=np.float64)
    return float(counts @ np.einsum("ij,ij->i", d, d))


def counted_rounding(counts: np.ndarray):
    """Round-to-nearest, carrying the table's quadratic form as ``rounding.quadratic(delta)``
    (the attribute :func:`cet_onnx.rounding.gptq.major_axis_rounding` gives a layer's rounding)."""

    def rounding(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
        return round_to_nearest(w, scale, zero_point, qmin, qmax)

    rounding.quadratic = lambda delta: quadratic_error(delta, counts)
    return rounding
