"""Pass: Conv / Gemm biases become INT32 with DequantizeLinear.

Rule: the bias ``b`` of a Conv or Gemm becomes initializers ``b_quantized`` (INT32,
``round(b / scale)``), ``b_scale`` (float32, input scale × weight scale per output channel) and
``b_zero_point`` (INT32 zeros), and a node ``b_DequantizeLinear`` (axis 0) that computes the
tensor ``b`` again — when all of these hold:

* the node is not one of ``float_nodes`` (fused into ``MatMulNBits``, :mod:`.matmul_nbits_form`);
* the node's input ``x`` gets activation Q/DQ (``x`` is in the activation plan, by its name
  before the activation pass renames the inputs: run this pass first);
* its weight is quantized per tensor or per channel (block-wise weights keep a float bias) and
  not INT2 (see :mod:`.int2_float_bias`) unless it is in ``int8_codes`` (widened, :mod:`.weight_qdq`); for Gemm, ``A`` is not a quantized weight and
  ``beta`` is 1;
* ``b`` is a float32 1-D initializer with one value per output channel, read by this node only;
* every scale is positive and every code fits in INT32.

The new nodes go to the front of the graph, after the weight DequantizeLinear nodes (a bias read inside
an If / Loop / Scan body: to the front of that body, with their initializers); names already taken get a
numeric suffix. ``quantized_biases`` lists the biases converted, in graph
order.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import all_nodes, home_graph, initializer, insert_front, take_over, uses_in
from cet_onnx.graph.passes.int2_float_bias import int2_weights
from cet_onnx.graph.tensors import array_tensor
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.quant.quantizer import ActivationParams, QuantizedWeight


class Int32BiasPass(ir.passes.InPlacePass):
    """Quantizes the biases the module docstring describes."""

    def __init__(self, qweights: Mapping[str, QuantizedWeight], weights: Sequence[WeightInfo],
                 act_params: Mapping[str, ActivationParams], float_nodes: Collection[str] = (),
                 int8_codes: Collection[str] = ()) -> None:
        super().__init__()
        self.int8_codes = frozenset(int8_codes)
        self.qweights = qweights
        self.weights = {w.name: w for w in weights}
        self.act_params = act_params
        self.float_nodes = frozenset(float_nodes)
        self.quantized_biases: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        int2 = int2_weights(self.qweights, self.int8_codes)
        self.quantized_biases = []
        nodes: dict[ir.Graph, list[ir.Node]] = {}
        for node in all_nodes(graph):
            if (node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or None in node.inputs[:3]
                    or node.name in self.float_nodes):
                continue
            x, w, b = node.inputs[:3]
            if w.name in int2 or (node.op_type == "Gemm" and x.name in self.qweights):
                continue
            home = home_graph(graph, b)
            bscale, qb = self._quantized(home, node, x.name, w.name, b)
            if qb is None:
                continue
            nodes.setdefault(home, []).append(self._dequantize(graph, home, names, b, qb, bscale))
        for home, dqs in nodes.items():
            insert_front(home, dqs)
        return ir.passes.PassResult(model, modified=bool(nodes))

    def _quantized(self, graph: ir.Graph, node: ir.Node, x: str, w: str, b: ir.Value):
        """(bias scale, INT32 codes), or (None, None) when a condition of the rule fails."""
        qw, px = self.qweights.get(w), self.act_params.get(x)
        if qw is None or px is None or qw.block_size is not None or not b.is_initializer() or uses_in(graph, b) != 1:
            return None, None
        if b.dtype != ir.DataType.FLOAT:   # a half-precision bias scale cannot hold input scale × weight scale
            return None, None
        bias = np.asarray(b.const_value.numpy(), dtype=np.float64)
        info = self.weights[w]
        nch = info.shape[info.channel_axis]
        if bias.ndim != 1 or bias.shape[0] != nch:
            return None, None
        if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
            return None, None
        wscale = (np.broadcast_to(qw.scale.astype(np.float64), (nch,)) if qw.axis is not None
                  else np.full(nch, float(qw.scale)))
        bscale = (px.scale * wscale).astype(np.float32)
        qb = np.rint(bias / bscale.astype(np.float64))
        if np.abs(qb).max(initial=0) >= 2**31 - 1 or not np.all(bscale > 0):
            return None, None
        return bscale, qb

    def _dequantize(self, graph: ir.Graph, home: ir.Graph, names: UniqueNames, b: ir.Value, qb: np.ndarray,
                    bscale: np.ndarray) -> ir.Node:
        name = b.name
        inputs = []
        for suffix, array in (("quantized", qb.astype(np.int32)), ("scale", bscale),
                              ("zero_point", np.zeros(qb.shape[0], np.int32))):
            fresh = names.value(f"{name}_{suffix}")
            inputs.append(initializer(home, fresh, array_tensor(fresh, array)))
        dq = ir.node("DequantizeLinear", inputs, {"axis": 0}, name=names.node(f"{name}_DequantizeLinear"))
        take_over(b, dq.outputs[0], graph)
        self.quantized_biases.append(name)
        return dq
