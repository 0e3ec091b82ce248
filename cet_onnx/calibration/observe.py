"""The calibrate stage: stream the calibration batches through range observers, one per activation tensor.

The planned activation tensors become extra graph outputs of one onnxruntime session, so memory
holds one batch of activations at a time, never the whole calibration set.

Tensors that carry ``±inf``, NaN or mask sentinels (``|x| ≥ 1e30``, e.g. ``finfo(float32).min``
in a Hugging Face attention mask) on any calibration batch are left float: no 8-bit grid can hold
both the mask and the values it masks, and clipping the sentinel would unmask the positions.
The calibration *inputs* were checked to be finite when they were read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.calibration import padding
from cet_onnx.calibration.branches import NEVER_RUN
from cet_onnx.calibration.data import model_inputs, samples_split
from cet_onnx.calibration.ranges import make_observer
from cet_onnx.errors import RuntimeFailure, first_line
from cet_onnx.graph import boundary
from cet_onnx.graph.rewriter import activation_tensors
from cet_onnx.progress import track
from cet_onnx.quant.quantizer import ActivationParams, activation_params
from cet_onnx.exposed import ExposedSession, pieces, samples_per_run
from cet_onnx.runner import Feed

if TYPE_CHECKING:
    from cet_onnx.options import ActivationOptions


#: magnitudes at or above this are mask sentinels, not activations (finfo(float16).max is 65504)
SENTINEL = 1e30


def calibrate(model: ir.Model, acts: ActivationOptions, batches: Sequence[Feed],
              providers: Sequence[str]) -> tuple[dict[str, ActivationParams], dict[str, str]]:
    """Scale and zero point of every activation tensor the rewrite will quantize, and those left float (why)."""
    tensors = activation_tensors(model, remove_relus=not acts.symmetric)
    left_float: dict[str, str] = {}
    ranges = collect_ranges(model, tensors, batches, providers, acts.method, symmetric=acts.symmetric,
                            num_bits=acts.bits, percentile=acts.percentile, left_float=left_float)
    return {t: activation_params(lo, hi, acts.bits, acts.symmetric) for t, (lo, hi) in ranges.items()}, left_float


def collect_ranges(model: ir.Model, tensors: Sequence[str], batches: Sequence[Feed], providers: Sequence[str],
                   method: str = "mse", symmetric: bool = False, num_bits: int = 8,
                   percentile: float = 99.999,
                   left_float: dict[str, str] | None = None) -> dict[str, tuple[float, float]]:
    """Activation range of every tensor in ``tensors``, streamed over ``batches``.

    A tensor with non-finite or sentinel values gets no range; it goes to ``left_float`` with
    the reason (without ``left_float``: a RuntimeFailure naming it).
    """
    if not tensors:
        return {}
    session = ExposedSession(model, tensors, providers)
    observers = {t: make_observer(method, symmetric=symmetric, num_bits=num_bits, percentile=percentile)
                 for t in tensors}
    names = list(tensors)
    excluded: dict[str, str] = {}
    observed: set[str] = set()
    split = bool(batches) and samples_split(model_inputs(boundary.to_ir(model)))
    try:
        rows = samples_per_run(batches[0], [session]) if split else None
    except Exception as exc:
        raise RuntimeFailure(f"onnxruntime failed during calibration: {first_line(exc)}") from None
    for feed in track([piece for b in batches for piece in pieces(b, rows)], desc=f"calibrating ({method})",
                      unit="run"):
        try:
            values = session.run(feed)
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime failed during calibration: {first_line(exc)}") from None
        tokens = padding.token_mask(feed)
        for name, value in values.items():
            if name in excluded:
                continue
            value = np.asarray(value, dtype=np.float32)
            if not value.size:
                continue    # inside an If branch this run did not take, or a Loop that ran no iteration
            why = _unquantizable(value)
            if why is not None:
                if left_float is None:
                    raise RuntimeFailure(f"activation '{name}': {why}")
                excluded[name] = why
                continue
            observers[name].update(padding.at_tokens(value, tokens))
            observed.add(name)
    excluded.update(session.dropped)
    session.close()
    for name in names:
        if name not in excluded and name not in observed:
            excluded[name] = f"never computed on the calibration data ({NEVER_RUN})"
    if left_float is not None:
        left_float.update(excluded)
    elif excluded:
        name, why = next(iter(excluded.items()))
        raise RuntimeFailure(f"activation '{name}': {why}")
    return {t: observers[t].range() for t in names if t not in excluded}


def _unquantizable(x: np.ndarray) -> str | None:
    """Why ``x`` cannot take a fixed-point grid (non-finite values or mask sentinels), or None."""
    finite = np.isfinite(x)
    if not finite.all():
        kinds = [k for k, bad in (("-inf", np.isneginf(x).any()), ("+inf", np.isposinf(x).any()),
                                  ("NaN", np.isnan(x).any())) if bad]
        return f"carries {'/'.join(kinds)} values (an attention mask or masked scores?)"
    if x.size and float(np.abs(x).max()) >= SENTINEL:
        return f"carries mask sentinels (|x| up to {float(np.abs(x).max()):.3g}, e.g. finfo.min)"
    return None
