"""``--act-mode auto`` on a transformer graph: static 8-bit activations where they keep the target, else dynamic.

Dynamic mode keeps transformers usable, but it is slow where onnxruntime has no dynamic kernel: a Conv weight
is dequantized on every run, and every MatMul quantizes its input at each call. Static QDQ runs
QLinearConv / QLinearMatMul instead, which is several times faster wherever 8-bit activations hold (Magika,
Dense + LayerNorm + Conv layers: dynamic 1.4× *slower* than float, static 3× faster, measured with
``tools/act_precision_bench.py``). So before a graph with attention or LayerNorm *and Conv weights* goes
dynamic:

1. the static plan is calibrated (the transformer rules: only weight MatMul / Gemm / Conv inputs quantized;
   LayerNorm, Softmax, GELU and residual inputs stay float) and the weights are quantized for it (±63 codes
   where integer kernels read them);
2. the written model runs on the probe samples against the activation target
   (:class:`~cet_onnx.allocation.activation_plan.Target`: top-1 agreement, cosine or SQNR per output kind);
3. it is kept when it meets the target; otherwise the model goes dynamic exactly as before.

No per-tensor probes here (``--act-mode static`` does those): the trial costs one calibration, one weight
quantization and one run of the probe samples. It applies to uniform weight formats only (with a size or
loss budget the allocation would run twice) and to models whose weights fit in memory.
"""

from __future__ import annotations

from typing import Any

from cet_onnx.allocation.activation_plan import describe, output_check
from cet_onnx.calibration.observe import calibrate
from cet_onnx.graph.act_mode import transformer_evidence
from cet_onnx.graph.integer_kernels import integer_kernel_weights
from cet_onnx.graph.rewriter import rewrite
from cet_onnx.io import external_data
from cet_onnx.prepared import Prepared
from cet_onnx.quant.quantizer import QuantizedWeight, WeightFormat
from cet_onnx.rounding.plan import quantize_all
from cet_onnx.timer import Timer


#: weight ops dynamic mode has no integer kernel for: their weights are dequantized on every run
DEQUANTIZED_IN_DYNAMIC = ("Conv", "ConvTranspose")


def applies(p: Prepared, opts: Any) -> bool:
    """Whether auto chose dynamic mode for a graph with weights dynamic mode runs slowly (Conv) and the trial
    can check it (module docstring). A graph of MatMuls only stays dynamic without a trial: there onnxruntime's
    dynamic kernels are as fast as static ones (all-MiniLM-L6-v2: 0.37× FP32 latency dynamic, 0.38× static)."""
    return (opts.activations.requested_mode == "auto" and p.act_mode == "dynamic" and opts.budget is None
            and any(w.op_type in DEQUANTIZED_IN_DYNAMIC for w in p.weights)
            and bool(p.calib_samples) and external_data.data_dir(p.model) is None)


def try_static(p: Prepared, opts: Any, formats: dict[str, WeightFormat], timer: Timer
               ) -> dict[str, QuantizedWeight] | None:
    """The weights quantized for static mode when static 8-bit activations meet the target (``p`` is then
    switched to static); None otherwise (``p`` stays dynamic, its ``act_mode_why`` says what the trial saw)."""
    with timer.stage("static trial"):
        params, left = calibrate(p.model, opts.activations, p.calib_batches, p.providers)
        if not params:
            return None
        before = {w.name: w.integer_kernel for w in p.weights}
        if not opts.weights.int8_full_range:
            static_kernels = integer_kernel_weights(p.model.graph, p.weights, "static", params)
            for w in p.weights:
                w.integer_kernel = w.name in static_kernels
        qweights = quantize_all(p, opts, formats, timer)
        check, target = output_check(p, opts)
        metrics = check.metrics(check.outputs(rewrite(p.model, p.weights, qweights, params).model))
        missed = target.misses(metrics)
    if missed:
        for w in p.weights:
            w.integer_kernel = before[w.name]
        p.act_mode_why += f"; static 8-bit activations, checked first, miss the target ({'; '.join(missed)})"
        return None
    p.act_mode, p.act_params, p.float_activations = "static", params, left
    p.act_mode_why = (f"auto: {transformer_evidence(p.model.graph)}, a transformer, but static 8-bit activations "
                      f"(weight MatMul / Gemm / Conv inputs only) keep the target on {check.samples} probe samples "
                      f"({describe(metrics)})")
    return qweights
