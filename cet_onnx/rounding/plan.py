"""The rounding stage: which rounding each weight gets, its layer Hessians, and quantizing every weight.

Major-axis (GPTQ-style) rounding needs each layer's input Hessian from the calibration data.
A uniform run whose Hessians would not fit :data:`HESSIAN_BYTES` collects them chunk by chunk
while quantizing; ``--sequential`` takes each layer's Hessian with the earlier layers quantized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cet_onnx.calibration.branches import NEVER_RUN
from cet_onnx.allocation.probes import probe_model
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.progress import track
from cet_onnx.quant.sizes import gather_format_ok
from cet_onnx.quant.quantizer import QuantizedWeight, RoundingPlan, WeightFormat, clip_for, grid_symmetric, \
    quantize_weight
from cet_onnx.rounding.gptq import major_axis_rounding
from cet_onnx.rounding.hessian import LayerHessian, collect_hessians, hessian_nbytes, layer_spec
from cet_onnx.rounding.row_counts import counted_rounding, gather_indices
from cet_onnx.timer import Timer

if TYPE_CHECKING:
    from cet_onnx.options import QuantizeOptions, WeightOptions
    from cet_onnx.prepared import Prepared

#: ``--rounding`` choices
ROUNDING_METHODS = ("auto", "rtn", "major-axis")

#: Major-axis rounding of a uniform format collects at most half the float32 weight bytes of layer
#: Hessians per pass over the calibration data, clamped to [HESSIAN_MIN_BYTES, HESSIAN_BYTES]
#: (and at least one layer); larger models take several passes.
HESSIAN_BYTES = 2**29
HESSIAN_MIN_BYTES = 2**28


def resolve_rounding(rounding: str, calib: str | None, low_bits: bool) -> tuple[str, int]:
    """(method, widest bit-width it applies to).

    ``auto`` is major-axis rounding for formats of 4 bits and below when real calibration data
    is given and such formats can be chosen (at 8 bits it costs time and gains nothing
    measurable), round-to-nearest otherwise; an explicit ``major-axis`` applies to every width.
    """
    if rounding == "auto":
        return ("major-axis", 4) if calib and low_bits else ("rtn", 8)
    return rounding, 8


def plan_rounding(p: Prepared, opts: QuantizeOptions, calib: str | None, mixed: bool) -> None:
    """Choose the rounding method and, unless they are deferred to quantizing, collect the Hessians.

    ``mixed``: the formats will be chosen from the candidate bits rather than ``--weight-bits``.
    """
    low_bits = min(opts.allocation.bits) <= 4 if mixed else opts.weights.bits <= 4
    p.rounding, p.roundings.max_bits = resolve_rounding(opts.weight_rounding.method, calib, low_bits)
    if p.rounding != "major-axis":
        return
    with p.timer.stage("hessians"):
        layer_specs(p)
        # Large Hessians are collected chunk by chunk where they are used: by quantize_all()
        # in a uniform run, by the candidate stage (every format of a chunk's weights) in a mixed one.
        p.hessians_deferred = not hessians_fit(p, opts, mixed) or (not mixed and opts.weight_rounding.sequential)
        if not p.hessians_deferred:
            prepare_major_axis(p, opts, keep_hessians=mixed and keeps_hessians(opts))


def hessians_fit(p: Prepared, opts: QuantizeOptions, mixed: bool) -> bool:
    """Whether every layer's Hessians may be held at once.

    A uniform run holds them within :func:`hessian_budget`. A mixed run holds them (twice over with
    fast probes, which keep each Hessian beside its factor) while every candidate format is
    quantized, up to half the float32 weight bytes or :data:`HESSIAN_MIN_BYTES`, whichever is larger.
    """
    total = sum(hessian_nbytes(w, p.specs[w.name]) for w in p.weights if w.name in p.specs)
    if not mixed:
        return total <= hessian_budget(p.weights)
    copies = 2 if keeps_hessians(opts) else 1
    return total * copies <= max(HESSIAN_MIN_BYTES, 2 * sum(w.size for w in p.weights))


def ensure_hessians(p: Prepared, opts: QuantizeOptions, timer: Timer) -> None:
    """Collect deferred Hessians now when they fit (a run that allocates, given a ``Prepared`` made for a
    uniform run); large ones stay deferred for the candidate stage."""
    if p.hessians_deferred and hessians_fit(p, opts, mixed=True):
        with timer.stage("hessians"):
            prepare_major_axis(p, opts, keep_hessians=keeps_hessians(opts))
        p.hessians_deferred = False


def keeps_hessians(opts: QuantizeOptions) -> bool:
    """Whether a run that allocates keeps the layer Hessians after factoring them: fast probes
    (``--probes fast``) extrapolate each format's cost with the layer's quadratic form."""
    return opts.allocation.probes == "fast"


def hessian_budget(weights: list[WeightInfo]) -> int:
    """Bytes of layer Hessians one pass may collect (see :data:`HESSIAN_BYTES`)."""
    return int(min(HESSIAN_BYTES, max(HESSIAN_MIN_BYTES, 2 * sum(w.size for w in weights))))


def layer_specs(p: Prepared) -> None:
    """Fill ``p.specs`` (how each weight meets its input), ``p.rtn_fallback`` (why a weight has no Hessian)
    and ``p.gathers`` (the embedding tables among those, whose lookups are counted instead)."""
    missing = [w for w in p.weights if w.name not in p.specs and w.name not in p.rtn_fallback]
    if not missing:
        return
    probe = probe_model(p.model, p.weights, p.act_params)
    for w in missing:
        spec, why = layer_spec(probe, w)
        if spec is None:
            p.rtn_fallback[w.name] = why
            indices = gather_indices(probe, w)
            if indices is not None:
                p.gathers[w.name] = (indices, w.shape[0])
        else:
            p.specs[w.name] = spec


def prepare_major_axis(p: Prepared, opts: QuantizeOptions, weight_feeds: dict | None = None,
                       only: list[WeightInfo] | None = None, keep_hessians: bool = False) -> None:
    """Collect layer Hessians (deployed activation numerics) and build each weight's GPTQ rounding.

    ``keep_hessians``: the roundings keep their Hessians (see :func:`keeps_hessians`).

    ``weight_feeds`` replaces some weights (already quantized ones, for a sequential pass); the
    others stay initializers, which onnxruntime holds once (fed as inputs, they would be copied).
    """
    layer_specs(p)
    feeds = weight_feeds or {}
    probe = probe_model(p.model, [w for w in p.weights if w.name in feeds], p.act_params)
    specs = [p.specs[w.name] for w in (only or p.weights) if w.name in p.specs]
    gathers = {w.name: p.gathers[w.name] for w in (only or p.weights) if keep_hessians and w.name in p.gathers}
    desc = "layer Hessians"
    if only is not None and specs:
        desc = f"layer Hessians ({specs[0].name}{f' + {len(specs) - 1} more' if len(specs) > 1 else ''})"
    hess = collect_hessians(probe, specs, p.calib_batches, feeds, p.providers,
                            opts.weight_rounding.hessian_rows, opts.run.seed, desc=desc, gathers=gathers)
    for w in only or p.weights:
        layer = hess.get(w.name)
        if layer is not None and not isinstance(layer, LayerHessian):   # an embedding table's lookups
            if layer.seen:
                p.roundings.roundings[w.name] = counted_rounding(layer.counts)
        elif layer is not None and not layer.rows:
            p.rtn_fallback[w.name] = layer.unobserved or f"its layer input was never computed on the calibration data ({NEVER_RUN})"
        elif layer is not None:
            # with fewer rows than columns the quadratic form (a columns³ product) costs more than probes
            keep = keep_hessians and layer.rows >= layer.columns
            p.roundings.roundings[w.name] = major_axis_rounding(w, p.specs[w.name], layer.hessians(),
                                                                 keep_hessians=keep)


def choose_format(w: WeightInfo, opts: WeightOptions) -> WeightFormat:
    """The uniform format for one weight: per-tensor, per-channel, or block-wise where it fits.

    An embedding table takes the nearest format it can be looked up in fast
    (:func:`~cet_onnx.quant.sizes.gather_format_ok`): below 8 bits, 4-bit blocks of
    ``--block-size`` or 32; otherwise INT8 per row.
    """
    fmt = _uniform_format(w, opts)
    if w.op_type != "Gather" or gather_format_ok(fmt, w.shape[w.reduction_axis]):
        return fmt
    block = WeightFormat(4, "block", opts.block_size or 32, symmetric=grid_symmetric(4, opts.grid))
    if opts.bits <= 4 and gather_format_ok(block, w.shape[w.reduction_axis]):
        return block
    return WeightFormat(8, "tensor" if opts.per_tensor else "channel", symmetric=True)


def _uniform_format(w: WeightInfo, opts: WeightOptions) -> WeightFormat:
    sym = grid_symmetric(opts.bits, opts.grid)
    if opts.per_tensor:
        return WeightFormat(opts.bits, "tensor", symmetric=sym)
    if opts.block_size and w.shape[w.reduction_axis] >= opts.block_size:
        return WeightFormat(opts.bits, "block", opts.block_size, symmetric=sym)
    return WeightFormat(opts.bits, "channel", symmetric=sym)


def quantize_all(p: Prepared, opts: QuantizeOptions, formats: dict[str, WeightFormat],
                 timer: Timer) -> dict[str, QuantizedWeight]:
    """Every weight in its format, with the planned rounding (chunked or sequential where that applies)."""
    major_axis = p.rounding == "major-axis"
    sequential = opts.weight_rounding.sequential
    if major_axis and p.hessians_deferred and not sequential:
        return chunked_quantize(p, opts, formats, timer)
    with timer.stage("quantize_weights"):
        if sequential and major_axis:
            return sequential_quantize(p, opts, formats)
        return quantize_weights(p.values, p.weights, formats, opts.weights.clip, p.roundings)


def quantize_weights(values: dict[str, np.ndarray], weights: list[WeightInfo], formats: dict[str, WeightFormat],
                     clip: str = "auto", roundings: RoundingPlan | None = None) -> dict[str, QuantizedWeight]:
    """Round every weight that has a format (with the rounding ``roundings`` plans, else round-to-nearest);
    a weight without one stays float."""
    roundings = roundings or RoundingPlan()
    return {w.name: quantize_weight(values[w.name], formats[w.name], w.channel_axis, w.reduction_axis,
                                    rounding=roundings.get(w.name, formats[w.name]),
                                    clip_ratio=clip_for(formats[w.name], clip), integer_kernel=w.integer_kernel)
            for w in weights if w.name in formats}


def hessian_chunks(p: Prepared, budget: int) -> list[list[WeightInfo]]:
    """Consecutive weights whose Hessians together stay within ``budget`` bytes (at least one per chunk)."""
    chunks: list[list[WeightInfo]] = [[]]
    used = 0
    for w in p.weights:
        size = hessian_nbytes(w, p.specs[w.name]) if w.name in p.specs else 0
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(w)
        used += size
    return chunks


def chunked_quantize(p: Prepared, opts: QuantizeOptions, formats: dict[str, WeightFormat],
                     timer: Timer) -> dict[str, QuantizedWeight]:
    """Major-axis rounding in bounded memory: per chunk of layers one pass collects their Hessians,
    the chunk is quantized, and its Hessians are dropped before the next chunk."""
    out: dict[str, QuantizedWeight] = {}
    for chunk in track(hessian_chunks(p, hessian_budget(p.weights)), desc="major-axis rounding in chunks", unit="chunk"):
        with timer.stage("hessians"):
            prepare_major_axis(p, opts, only=chunk)
        with timer.stage("quantize_weights"):
            out.update(quantize_weights(p.values, chunk, formats, opts.weights.clip, p.roundings))
        for w in chunk:
            p.roundings.roundings.pop(w.name, None)
    return out


def sequential_quantize(p: Prepared, opts: QuantizeOptions, formats: dict[str, WeightFormat]) -> dict[str, QuantizedWeight]:
    """Quantize in graph order, each layer's Hessian taken with every earlier weight already quantized."""
    feeds: dict[str, np.ndarray] = {}
    out: dict[str, QuantizedWeight] = {}
    for w in (w for w in p.weights if w.name in formats):   # a weight without a format stays float
        if w.name in p.specs:
            prepare_major_axis(p, opts, weight_feeds=feeds, only=[w])
        qw = quantize_weights(p.values, [w], {w.name: formats[w.name]}, opts.weights.clip, p.roundings)[w.name]
        out[w.name] = qw
        feeds[w.name] = qw.dequantize()
        p.roundings.roundings.pop(w.name, None)  # its Hessian factor is not needed again
    return out
