"""Pass: store each quantized weight as packed integer codes followed by DequantizeLinear.

Rules, for every weight ``W`` in the plan (in plan order):

* initializers ``W_quantized`` (the codes, packed as INT8 / INT4 / INT2), ``W_scale`` (float32;
  float16 / bfloat16 for a weight of that type) and ``W_zero_point`` (same integer type as the
  codes) replace ``W``;
* a ``DequantizeLinear`` node ``W_DequantizeLinear`` computes the float weight into a tensor
  that keeps the name ``W``, so the consumers are untouched. Per-channel weights set ``axis``;
  block-wise ones set ``axis`` and ``block_size`` (opset 21);
* INT2 weights are written in the blocked form (except those in ``plain_int2``: MatMul weights that run
  as ``MatMulNBits``, :mod:`.matmul_nbits_form`, keep a per-channel scale); a 2-D INT2 weight whose output channels are not a multiple of 4
  (onnxruntime's 2-bit ``MatMulNBits`` gets them wrong) is reshaped to its own shape after
  dequantization (``W_dequantized_2d``, ``W_Reshape``, ``W_shape``), which stops that fusion (:func:`cet_onnx.quant.sizes.stored_form`):
  a per-channel or per-tensor scale becomes one block spanning the whole reduction axis, and a
  Conv kernel is dequantized flattened to 2-D into ``W_dequantized_2d`` and reshaped back by
  ``W_Reshape`` to the shape in initializer ``W_shape``. onnxruntime's QDQ selectors exclude 4-
  and 16-bit weights but not 2-bit ones, fuse INT2 weights into QLinearConv / QLinearMatMul and
  then refuse to load the model; they never fuse blocked scales.

The new nodes go to the front of the graph (they read initializers only); a name already
taken gets a numeric suffix. A weight that was also a graph input stops being one. A weight read
only inside one If / Loop / Scan body (:mod:`.lift_subgraph_weights`) gets its initializers and
nodes at the front of that body instead, where onnxruntime's QDQ fusions look for them.
"""

from __future__ import annotations

from typing import Collection, Mapping

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import home_graph, initializer, insert_front, take_over
from cet_onnx.graph.tensors import array_tensor, float_numpy, int_tensor
from cet_onnx.quant.quantizer import QuantizedWeight
from cet_onnx.quant.sizes import stored_form


class WeightQDQPass(ir.passes.InPlacePass):
    """Quantized weights become packed initializers and DequantizeLinear (see the module docstring)."""

    def __init__(self, qweights: Mapping[str, QuantizedWeight], plain_int2: Collection[str] = ()) -> None:
        super().__init__()
        self.qweights = qweights
        self.plain_int2 = frozenset(plain_int2)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        for name, qw in self.qweights.items():
            home = home_graph(graph, graph.initializers[name])
            insert_front(home, self._dequantize(graph, home, names, name, qw, name not in self.plain_int2))
        return ir.passes.PassResult(model, modified=bool(self.qweights))

    @staticmethod
    def _dequantize(graph: ir.Graph, home: ir.Graph, names: UniqueNames, name: str, qw: QuantizedWeight,
                    int2_blocked: bool = True) -> list[ir.Node]:
        q, scale, zp, axis, block, reshape = stored_form(qw, int2_blocked)
        dtype = graph.initializers[name].dtype
        inputs = []
        for suffix, tensor in (("quantized", lambda n: int_tensor(n, q, qw.fmt.bits)),
                               ("scale", lambda n: array_tensor(n, scale.astype(float_numpy(dtype)))),
                               ("zero_point", lambda n: int_tensor(n, zp, qw.fmt.bits))):
            fresh = names.value(f"{name}_{suffix}")
            inputs.append(initializer(home, fresh, tensor(fresh)))
        nodes, out = dequantize_nodes(home, names, name, inputs, dtype, axis, block,
                                      tuple(qw.q.shape) if reshape else None)
        take_over(graph.initializers[name], out, graph)
        return nodes


def dequantize_nodes(graph: ir.Graph, names: UniqueNames, name: str, inputs: list[ir.Value], dtype: ir.DataType,
                     axis: int | None, block: int | None,
                     reshape_to: tuple[int, ...] | None) -> tuple[list[ir.Node], ir.Value]:
    """``name_DequantizeLinear`` of ``inputs`` (codes, scale, zero point) with ``axis`` / ``block_size``,
    then, for codes stored flattened, ``name_Reshape`` back to ``reshape_to`` (int64 initializer
    ``name_shape``); the nodes and the value that computes weight ``name`` (type ``dtype``)."""
    attrs = {k: int(v) for k, v in (("axis", axis), ("block_size", block)) if v is not None}
    dq = ir.node("DequantizeLinear", inputs, attrs, name=names.node(f"{name}_DequantizeLinear"))
    nodes = [dq]
    out = dq.outputs[0]
    out.dtype = dtype
    if reshape_to is not None:
        out.name = names.value(f"{name}_dequantized_2d")
        shape_name = names.value(f"{name}_shape")
        shape = initializer(graph, shape_name, array_tensor(shape_name, np.array(reshape_to, np.int64)))
        nodes.append(ir.node("Reshape", [out, shape], name=names.node(f"{name}_Reshape")))
        out = nodes[-1].outputs[0]
        out.dtype = dtype
    return nodes, out
