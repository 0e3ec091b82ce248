"""Pass: QuantizeLinear → DequantizeLinear on the planned activation tensors.

Rules, for every tensor ``t`` of the plan (in plan order):

* initializers ``t_scale`` (float32; float16 / bfloat16 for a tensor of that type) and ``t_zero_point`` (uint8 / int8 / uint16 / int16) and
  nodes ``t_QuantizeLinear`` (output ``t_QuantizeLinear_Output``) and ``t_DequantizeLinear``
  (output ``t_DequantizeLinear_Output``) are added; names already taken get a numeric suffix;
* the consumers in ``activation_ops`` (default domain) read ``t_DequantizeLinear_Output``
  instead of ``t``; other consumers keep reading the float ``t``, except that the first output
  of a Conv / ConvTranspose / Gemm / MatMul is read dequantized by every consumer. Graph
  outputs stay float (also when a Cast makes them the graph output: a half-precision model with
  float32 outputs);
* the nodes named in ``float_nodes`` (MatMuls fused into ``MatMulNBits``,
  :mod:`.matmul_nbits_form`) keep reading float inputs, and a planned tensor one of them
  produces gets no pair;
* a pair whose dequantized output nothing reads after the rewiring (every consumer of ``t`` is
  one of ``float_nodes`` or outside ``activation_ops``) is removed again, with its scale and
  zero point: it would cost a run-time quantization for nothing;
* the pair goes right after ``t``'s producer (after the pairs of its earlier outputs), or at
  the front of the graph, after the weight and bias DequantizeLinear nodes, when ``t`` is a
  graph input. This is the order the rewriter's stable topological sort always gave. A tensor
  inside an If branch or a Loop / Scan body gets its pair, scale and zero point in that subgraph
  (a body input: at the front of the body); readers in any graph are rewired.

:func:`activation_tensors` chooses the plan (the CNN rules), :func:`transformer_activation_tensors`
the plan of a graph with attention or LayerNorm, whose pass then gets
:data:`TRANSFORMER_ACTIVATION_OPS` as ``activation_ops``.
"""

from __future__ import annotations

from typing import Collection, Mapping

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import FRONT, all_nodes, branch_nodes, initializer, insert_front, is_constant, is_onnx, \
    values_by_name
from cet_onnx.graph.passes.fold_relu import WEIGHT_OPS, foldable_relus
from cet_onnx.graph.tensors import array_tensor, float_numpy
from cet_onnx.quant.quantizer import ActivationParams

#: Ops whose float activation inputs get QuantizeLinear/DequantizeLinear, following
#: onnxruntime's QDQ conventions (its CPU fusions look for Q/DQ around these).
ACTIVATION_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Flatten", "Reshape", "Transpose",
    "Squeeze", "Unsqueeze", "Resize",
})
WEIGHT_OUTPUT_OPS = WEIGHT_OPS
#: Static mode on a transformer graph: the ops whose inputs are quantized. LayerNorm, Softmax,
#: GELU and residual Add inputs stay float (published practice: their ranges are wide or
#: outlier-heavy), and so do the attention products (a MatMul of two activations) and every
#: MatMul / Gemm output; a MatMul / Gemm gets Q/DQ on its activation only when its other
#: operand is a weight. Convolution parts of a hybrid model keep their CNN rules.
TRANSFORMER_ACTIVATION_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool",
                                        "MatMul", "Gemm"})
_MATMULS = ("MatMul", "Gemm")
_FIRST_INPUT_ONLY = ("Reshape", "Resize", "Clip", "Squeeze", "Unsqueeze")


def _is_float(value: ir.Value) -> bool:
    return isinstance(value.type, ir.TensorType) and value.type.dtype in (
        ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _is_model_output(value: ir.Value) -> bool:
    """A graph output, or read only by Casts that are (a half-precision model's float32 outputs, ``keep_io_types``)."""
    if value.is_graph_output():
        return True
    readers = [node for node, _ in value.uses()]
    return bool(readers) and all(n.op_type == "Cast" and n.outputs[0].is_graph_output() for n in readers)


def activation_tensors(graph: ir.Graph, remove_relus: bool,
                       activation_ops: Collection[str] = ACTIVATION_OPS) -> list[str]:
    """Float activation tensors that get Q/DQ, in graph order (after optional Relu folding).

    They are the float inputs of the ``activation_ops`` that are not constant (only the data
    input of Reshape / Resize / Clip / Squeeze / Unsqueeze, input and weight of Conv /
    ConvTranspose / Gemm; an initializer, or a Transpose / Cast of one such as a tied LM head's
    weight, is constant), and the first output of every Conv / ConvTranspose / Gemm / MatMul that is not a
    graph output, directly or through a Cast (so that onnxruntime finds the output Q it needs to fuse them into
    QLinearConv / QLinearMatMul, whatever op follows). A tensor counts as float when its type
    (from the graph inputs, outputs or value_info) says so.
    """
    skip = set(foldable_relus(graph)) if remove_relus else set()
    relu_out = {relu.inputs[0]: relu.outputs[0] for relu in skip}
    seen: dict[str, None] = {}
    for node in branch_nodes(graph):
        if node in skip or node.op_type not in activation_ops or not is_onnx(node):
            continue
        if node.op_type in WEIGHT_OUTPUT_OPS:
            out = relu_out.get(node.outputs[0], node.outputs[0])
            if not _is_model_output(out) and _is_float(out):
                seen.setdefault(out.name)
        data = node.inputs[:1] if node.op_type in _FIRST_INPUT_ONLY else node.inputs
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            data = node.inputs[:2]
        for value in data:
            if value is not None and value.name and not is_constant(value) and _is_float(value):
                seen.setdefault(value.name)
    return list(seen)


def transformer_activation_tensors(graph: ir.Graph) -> list[str]:
    """The plan of :data:`TRANSFORMER_ACTIVATION_OPS`: the CNN plan of the convolution parts
    (without Relu folding: a folded Relu's output may have float readers), and the activation
    input of every MatMul / Gemm whose other operand is a weight."""
    cnn_ops = TRANSFORMER_ACTIVATION_OPS - set(_MATMULS)
    seen = dict.fromkeys(activation_tensors(graph, False, cnn_ops))
    for node in branch_nodes(graph):
        if node.op_type in _MATMULS and is_onnx(node) and len(node.inputs) >= 2 and node.inputs[1] is not None:
            a = node.inputs[0]
            if is_constant(node.inputs[1]) and a is not None and a.name and not is_constant(a) and _is_float(a):
                seen.setdefault(a.name)
    return list(seen)


def _remove_pair(graph: ir.Graph, pair: list[ir.Node]) -> None:
    """Remove a Q/DQ pair nothing reads, and its scale and zero point initializers."""
    params = [v for v in pair[0].inputs[1:] if v is not None]
    graph.remove(pair[::-1], safe=True)
    for v in params:
        if not v.uses() and v.name in graph.initializers:
            graph.initializers.pop(v.name)


class ActivationQDQPass(ir.passes.InPlacePass):
    """Adds the Q/DQ pairs of ``act_params`` and points the consumers at them (module docstring)."""

    def __init__(self, act_params: Mapping[str, ActivationParams],
                 activation_ops: Collection[str] = ACTIVATION_OPS, float_nodes: Collection[str] = ()) -> None:
        super().__init__()
        self.act_params = act_params
        self.activation_ops = activation_ops
        self.float_nodes = frozenset(float_nodes)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        values = values_by_name(graph, subgraphs=True)
        original = [n for n in all_nodes(graph) if not n.meta.get(FRONT)]
        after: dict[ir.Node, ir.Node] = {}
        pairs: dict[str, list[ir.Node]] = {}
        for t, p in self.act_params.items():
            value = values.get(t) or ir.Value(name=t)
            if value.producer() is not None and value.producer().name in self.float_nodes:
                continue
            producer = value.producer()
            home = producer.graph if producer is not None and producer.graph is not None else (value.graph or graph)
            pair = self._pair(home, names, value, p)
            if producer is None or producer.graph is None:
                insert_front(home, pair)
            else:
                home.insert_after(after.get(producer, producer), pair)
                after[producer] = pair[-1]
            pairs[t] = pair
        self._rewire(original, {t: pair[-1].outputs[0] for t, pair in pairs.items()})
        for t, pair in pairs.items():
            if not pair[-1].outputs[0].uses() and not pair[-1].outputs[0].is_graph_output():
                _remove_pair(pair[0].graph, pair)
        return ir.passes.PassResult(model, modified=bool(self.act_params))

    @staticmethod
    def _pair(graph: ir.Graph, names: UniqueNames, t: ir.Value, p: ActivationParams) -> list[ir.Node]:
        scale_name, zp_name = names.value(f"{t.name}_scale"), names.value(f"{t.name}_zero_point")
        scale = initializer(graph, scale_name, array_tensor(scale_name, np.array(p.scale, float_numpy(t.dtype))))
        zp = initializer(graph, zp_name, array_tensor(zp_name, np.array(p.zero_point, p.dtype)))
        q = ir.node("QuantizeLinear", [t, scale, zp], outputs=[ir.Value(name=names.value(f"{t.name}_QuantizeLinear_Output"))],
                    name=names.node(f"{t.name}_QuantizeLinear"))
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp],
                     outputs=[ir.Value(name=names.value(f"{t.name}_DequantizeLinear_Output"), type=t.type)],
                     name=names.node(f"{t.name}_DequantizeLinear"))
        return [q, dq]

    def _rewire(self, nodes: list[ir.Node], dequantized: dict[str, ir.Value]) -> None:
        """Point the consumers at the dequantized tensors, as the rules say."""
        weight_outputs = {n.outputs[0].name for n in nodes if n.op_type in WEIGHT_OUTPUT_OPS and n.outputs
                          and n.outputs[0].name in dequantized}
        for node in nodes:
            if node.name in self.float_nodes:
                continue
            every = node.op_type in self.activation_ops and is_onnx(node)
            for i, value in enumerate(node.inputs):
                if value is not None and value.name in dequantized and (every or value.name in weight_outputs):
                    node.replace_input_with(i, dequantized[value.name])
