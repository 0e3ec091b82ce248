"""Float as one more candidate format of every weight, offered under a latency budget.

Some layers have no quantized form faster than float on the target: onnxruntime's CPU provider
dequantizes an INT4 Conv weight on every run, and a small or depthwise ``QLinearConv`` can be
slower than its float Conv. Without float among the formats such a model cannot meet
``--max-latency-ratio 1.0`` at all. So, with a latency budget, each weight also gets the column
*float*: loss change 0 (the weight is not perturbed), its float bytes, and the latency of its
layer left float in the emitted graph (measured like every other form). The exact solve then
pays bytes for speed only where the measured costs say it must.

:class:`WithFloat` presents the candidates and the sensitivities with that extra last column to
the solver, the closed loops and the fidelity check; the weights it chooses float are simply left
out of the quantized weights (every later stage treats an absent weight as float).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cet_onnx.allocation.allocate import Candidates, Sensitivity
from cet_onnx.quant.quantizer import QuantizedWeight


@dataclass(frozen=True)
class FloatFormat:
    """The weight stays in the model's float type (the label and bits the reports show)."""

    bits: int = 32
    granularity: str = "float"
    block_size: None = None
    symmetric: bool = True

    @property
    def label(self) -> str:
        return "float"


KEEP_FLOAT = FloatFormat()
#: why a weight the solver kept float is float (the report's reason)
WHY_FLOAT = "float is its fastest form within the latency budget"


def is_float(fmt: object) -> bool:
    return isinstance(fmt, FloatFormat)


class WithFloat:
    """``cand`` with a last format, :data:`KEEP_FLOAT` (its float bytes, always available), for the solver.

    Offers what the allocation reads of :class:`Candidates` (``weights``, ``formats``, ``sizes``,
    ``available``, ``chosen``); ``chosen`` leaves float weights out.
    """

    def __init__(self, cand: Candidates):
        self.base = cand
        self.weights = cand.weights
        self.formats = [*cand.formats, KEEP_FLOAT]
        self.float_index = len(cand.formats)
        float_bytes = [float(np.asarray(cand.values[w.name]).dtype.itemsize * w.size) for w in cand.weights]
        self.sizes = np.column_stack([cand.sizes, float_bytes])

    @property
    def available(self) -> np.ndarray:
        return np.isfinite(self.sizes)

    def chosen(self, choice: Sequence[int]) -> dict[str, QuantizedWeight]:
        """The quantized weights of ``choice`` (weights chosen float are left out)."""
        return {w.name: self.base.quantize(i, int(j)) for i, (w, j) in enumerate(zip(self.weights, choice))
                if int(j) != self.float_index}

    def sensitivity(self, sens: Sensitivity) -> Sensitivity:
        """``sens`` with the float column: no loss change."""
        costs = np.column_stack([sens.costs, np.zeros(len(self.weights))])
        return Sensitivity(sens.allocator, costs, sens.details, sens.runs, sens.seconds)
