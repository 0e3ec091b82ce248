"""Pass: Conv / ConvTranspose / Gemm nodes with an INT2 weight keep (or get) a float bias.

Rule: such a node without a bias gets a float32 zero bias ``W_zero_bias`` (one per weight, as
long as its output channels: ``O`` for Conv, ``O/g · g`` for ConvTranspose, the weight's channel
axis for Gemm); a bias it has stays float. onnxruntime's QDQ selectors need every input to come
from DequantizeLinear, so a float bias stops them from fusing an INT2 weight into QLinearConv —
which they would otherwise do (they exclude 4-bit but not 2-bit weights, and can move
DequantizeLinear past the Reshape of the weight pass) and then fail to load the model. The
INT32 bias pass leaves these nodes alone. Weights in ``int8_codes`` (widened to INT8 before their
DequantizeLinear, :mod:`.weight_qdq`) are meant to be fused, and are left alone.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import initializer
from cet_onnx.graph.tensors import array_tensor, float_numpy
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.quant.quantizer import QuantizedWeight
from cet_onnx.quant.sizes import container_bits

BIASED_OPS = ("Conv", "ConvTranspose", "Gemm")


def int2_weights(qweights: Mapping[str, QuantizedWeight], int8_codes: Collection[str] = ()) -> set[str]:
    """Names of the weights stored in INT2 that reach their DequantizeLinear as INT2 (not widened to INT8
    for onnxruntime's INT8 kernels: ``int8_codes``, :mod:`.weight_qdq`)."""
    return {n for n, qw in qweights.items() if container_bits(qw.fmt.bits) == 2 and n not in int8_codes}


class Int2FloatBiasPass(ir.passes.InPlacePass):
    """Gives INT2-weight Conv / ConvTranspose / Gemm nodes a float zero bias where they have none."""

    def __init__(self, qweights: Mapping[str, QuantizedWeight], weights: Sequence[WeightInfo],
                 int8_codes: Collection[str] = ()) -> None:
        super().__init__()
        self.qweights = qweights
        self.channel_axis = {w.name: w.channel_axis for w in weights}
        self.int8_codes = frozenset(int8_codes)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        int2 = int2_weights(self.qweights, self.int8_codes)
        zeros: dict[str, ir.Value] = {}
        for node in graph:
            if node.op_type not in BIASED_OPS or len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            w = node.inputs[1].name
            if w not in int2 or (len(node.inputs) >= 3 and node.inputs[2] is not None):
                continue
            if w not in zeros:
                fresh = names.value(f"{w}_zero_bias")
                zeros[w] = initializer(graph, fresh, array_tensor(
                    fresh, np.zeros(self._channels(node, w), float_numpy(node.inputs[1].dtype))))
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, zeros[w])
        return ir.passes.PassResult(model, modified=bool(zeros))

    def _channels(self, node: ir.Node, w: str) -> int:
        shape = self.qweights[w].q.shape
        if node.op_type == "Conv":
            return shape[0]
        if node.op_type == "ConvTranspose":
            return shape[1] * node.attributes.get_int("group", 1)
        return shape[self.channel_axis[w]]
