"""Which weights onnxruntime multiplies in its u8 × s8 integer kernels, where full-range INT8 codes can saturate.

onnxruntime's x86 CPU kernels for QLinearConv / QLinearMatMul (static activation Q/DQ fused around
an INT8 weight), MatMulInteger / DynamicQuantizeMatMul and DynamicQuantizeLSTM (dynamic activations)
multiply uint8 activations by int8 weights. Without AVX-512 VNNI / AVX-VNNI (AMD EPYC before Zen 4,
Intel before Cascade Lake, many cloud servers) they use ``vpmaddubsw``, which adds two u8 × s8
products into an int16 and *saturates*: 2 · 255 · 127 = 64,770 does not fit 32,767. onnxruntime's
documentation names the remedy (``reduce_range``): weight codes within ±63 never saturate
(2 · 255 · 63 = 32,130). Measured on such a CPU (2-core AMD EPYC, AVX2 only, onnxruntime 1.32): a
W8A8 Scan RNN with full-range INT8 weights gave 53 % relative error with the fused kernels and 3.3 %
with the same graph run unfused; with ±63 codes, 2.8 % both ways. The server's CPU is not known when
a model is quantized, so the weights such kernels read get the 7-bit grid by default
(:func:`cet_onnx.quant.quantizer.saturation_safe`); ``--int8-full-range`` keeps ±127 for servers
with VNNI (or ARM), where the kernels do not saturate.

Rules: a weight reads through an integer kernel when

* activations are ``static`` and the weight's Conv / ConvTranspose / MatMul / Gemm has its other
  (data) input quantized (a planned activation Q/DQ point), or
* activations are ``dynamic`` and the weight is input B of a MatMul / Gemm (the dynamic pass's
  MatMulInteger), or
* activations are quantized at all (``static`` or ``dynamic``) and the weight is the W / R input of
  an LSTM (the rewriter makes it a DynamicQuantizeLSTM in both modes).

Only 8-bit per-channel / per-tensor formats change (blocked and sub-8-bit weights run in other kernels).
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.weights import WeightInfo

_STATIC_OPS = {"Conv": 0, "ConvTranspose": 0}   # op → index of the data input (MatMul / Gemm: the other one)
_DYNAMIC_OPS = ("MatMul", "Gemm")


def integer_kernel_weights(graph: ir.Graph, weights: Sequence[WeightInfo], act_mode: str,
                           quantized: Collection[str] = ()) -> set[str]:
    """Names of ``weights`` read by a u8 × s8 integer kernel (module docstring); ``quantized``: the
    activation tensors static mode quantizes, or their parameters (then only 8-bit ones count: onnxruntime
    has no 16-bit integer kernel, a layer whose input is 16-bit runs in float)."""
    if act_mode not in ("static", "dynamic"):
        return set()
    if isinstance(quantized, Mapping):
        quantized = {t for t, a in quantized.items() if np.dtype(a.dtype).itemsize == 1}
    names = {w.name for w in weights}
    found = set()
    for node in graph.all_nodes():
        for index, value in enumerate(node.inputs):
            source = _weight_behind(value, names)
            if source is not None and node.domain in ("", "ai.onnx") and _reads_integer(node, index, act_mode, quantized):
                found.add(source)
    return found


def _weight_behind(value: ir.Value | None, names: Collection[str]) -> str | None:
    """The weight ``value`` is, or is a Transpose of (a tied LM head reads ``Transpose(E)``), else None."""
    if value is None:
        return None
    if value.name in names:
        return value.name
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and node.inputs and node.inputs[0] is not None \
            and node.inputs[0].name in names:
        return node.inputs[0].name
    return None


def _reads_integer(node: ir.Node, index: int, act_mode: str, quantized: Collection[str]) -> bool:
    op = node.op_type
    if op == "LSTM":
        return index in (1, 2)
    if act_mode == "dynamic":
        return op in _DYNAMIC_OPS and index == 1
    if op in _STATIC_OPS:
        data = _STATIC_OPS[op]
    elif op in _DYNAMIC_OPS and index in (0, 1):
        data = 1 - index
    else:
        return False
    return index != data and len(node.inputs) > data and node.inputs[data] is not None \
        and node.inputs[data].name in quantized
