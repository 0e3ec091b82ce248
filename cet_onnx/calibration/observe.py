"""The calibrate stage: stream the calibration batches through range observers, one per activation tensor.

The planned activation tensors become extra graph outputs of one onnxruntime session, so memory
holds one batch of activations at a time, never the whole calibration set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.calibration.ranges import make_observer
from cet_onnx.errors import RuntimeFailure, first_line
from cet_onnx.graph.rewriter import activation_tensors
from cet_onnx.progress import track
from cet_onnx.quant.quantizer import ActivationParams, activation_params
from cet_onnx.graph.passes.extra_outputs import with_outputs
from cet_onnx.runner import Feed, make_session

if TYPE_CHECKING:
    from cet_onnx.options import ActivationOptions


def calibrate(model: ir.Model, acts: ActivationOptions, batches: Sequence[Feed], providers: Sequence[str]) -> dict[str, ActivationParams]:
    """Scale and zero point of every activation tensor the rewrite will quantize."""
    tensors = activation_tensors(model, remove_relus=not acts.symmetric)
    ranges = collect_ranges(model, tensors, batches, providers, acts.method, symmetric=acts.symmetric,
                            num_bits=acts.bits, percentile=acts.percentile)
    return {t: activation_params(lo, hi, acts.bits, acts.symmetric) for t, (lo, hi) in ranges.items()}


def collect_ranges(model: ir.Model, tensors: Sequence[str], batches: Sequence[Feed], providers: Sequence[str],
                   method: str = "minmax", symmetric: bool = False, num_bits: int = 8,
                   percentile: float = 99.999) -> dict[str, tuple[float, float]]:
    """Activation range of every tensor in ``tensors``, streamed over ``batches``."""
    if not tensors:
        return {}
    augmented = with_outputs(model, tensors)
    session = make_session(augmented, providers, optimize=False)
    observers = {t: make_observer(method, symmetric=symmetric, num_bits=num_bits, percentile=percentile)
                 for t in tensors}
    names = list(tensors)
    for feed in track(batches, desc=f"calibrating ({method})", unit="batch"):
        try:
            values = session.run(names, feed)
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime failed during calibration: {first_line(exc)}") from None
        for name, value in zip(names, values):
            try:
                observers[name].update(np.asarray(value, dtype=np.float32))
            except ValueError as exc:
                raise RuntimeFailure(f"activation '{name}': {exc}") from None
    return {t: observers[t].range() for t in names}
