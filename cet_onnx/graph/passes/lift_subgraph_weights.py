"""Pass: move the weights of layers inside If / Loop / Scan bodies to main-graph initializers.

Exporters keep a branch's or a loop body's weights in the subgraph, as its initializers or as
``Constant`` nodes in it. A subgraph may read any value of its outer scopes, so once these weights
are main-graph initializers they are found, calibrated, quantized and rewritten like every other
weight (the rewrite puts a weight's DequantizeLinear into the one body that reads it,
:func:`._graph.home_graph`). Two branches reading one outer weight keep reading one initializer,
quantized once.

Rules, for every node at any depth of nesting below the main graph whose op is one of
:data:`LIFTED_INPUTS` (default domain), and each input at the positions listed there:

* a float tensor that is an initializer of the node's own graph, or the output of a default-domain
  ``Constant`` node of that graph whose only attribute is ``value``, becomes a main-graph
  initializer, and every reader of the old value now reads it;
* it keeps its name when no other value of the model has it, else gets a numeric suffix;
* a lifted Constant node is removed, a lifted subgraph initializer dropped from its graph;
* a constant that is also an output of its subgraph stays where it is (the subgraph must
  still produce it), as does everything in the main graph.
"""

from __future__ import annotations

import collections

import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import initializer, is_onnx

#: op type → input positions whose constants are lifted (weights and biases)
LIFTED_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
                 "Gather": (0,), "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3)}
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


class LiftSubgraphWeightsPass(ir.passes.InPlacePass):
    """Constant weights of layers in subgraphs become main-graph initializers; ``lifted`` maps each
    new initializer's name to the subgraph value it replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.lifted: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = model.graph
        names = UniqueNames(main)
        counts = _name_counts(main)
        self.lifted = {}
        done: dict[ir.Value, ir.Value] = {}
        for graph in main.subgraphs():
            for node in list(graph):
                for idx in LIFTED_INPUTS.get(node.op_type, ()) if is_onnx(node) else ():
                    value = node.inputs[idx] if idx < len(node.inputs) else None
                    if value is None or value in done:
                        continue
                    tensor = _own_constant(graph, value)
                    if tensor is not None:
                        done[value] = self._lift(main, graph, value, tensor, names, counts)
        return ir.passes.PassResult(model, modified=bool(done))

    def _lift(self, main: ir.Graph, graph: ir.Graph, value: ir.Value, tensor: ir.TensorProtocol,
              names: UniqueNames, counts: collections.Counter) -> ir.Value:
        old_name = value.name or "weight"
        name = old_name if counts[old_name] == 1 else names.value(old_name)
        producer = value.producer()
        lifted = initializer(main, name, tensor)
        value.replace_all_uses_with(lifted)
        if producer is not None:
            graph.remove(producer, safe=True)
        else:
            graph.initializers.pop(value.name)
        self.lifted[name] = old_name
        return lifted


def _own_constant(graph: ir.Graph, value: ir.Value) -> ir.TensorProtocol | None:
    """The float tensor of ``value`` when it is a constant ``graph`` itself holds (and no output of it)."""
    if value.is_graph_output():
        return None
    node = value.producer()
    if node is None:
        tensor = value.const_value if value.is_initializer() and value.name in graph.initializers \
            and graph.initializers[value.name] is value else None
    elif node.graph is graph and node.op_type == "Constant" and is_onnx(node) and list(node.attributes) == ["value"]:
        tensor = node.attributes["value"].as_tensor()
    else:
        tensor = None
    return tensor if tensor is not None and tensor.dtype in _FLOATS else None


def _name_counts(main: ir.Graph) -> collections.Counter:
    """How many values of the whole model carry each name (graph inputs, initializers, node outputs)."""
    counts: collections.Counter = collections.Counter()
    for graph in (main, *main.subgraphs()):
        counts.update(v.name for v in (*graph.inputs, *graph.initializers.values()) if v.name)
        counts.update(v.name for node in graph for v in node.outputs if v.name)
    return counts
