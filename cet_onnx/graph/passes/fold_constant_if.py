"""Pass: replace each ``If`` whose condition is known before the model runs by the branch it takes.

After ``--fix-input sr=16000`` an ``If(Equal(sr, 16000))`` always takes one branch; inlining that
branch into the graph makes its layers ordinary main-graph layers, with their own names (onnxsim
folds such an If too, but renames every value of the branch it inlines).

Rules, repeated until nothing changes (an inlined branch may hold another such If):

* a condition is known when it is an initializer, the output of a ``Constant`` node, or the output
  of a default-domain node of :data:`PURE_OPS` whose inputs are all known (evaluated with onnx's
  reference evaluator);
* the taken branch's nodes move, in order, to just before the If; its initializers become
  initializers of the If's graph; each If output is replaced by the branch's matching output (an
  ``Identity`` is added where that output is a value the branch only reads from outside), which keeps the
  If output's name, type and shape;
* the If node is removed; ``folded`` lists ``(If name, "then" | "else")``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from cet_onnx.graph.passes._graph import is_onnx

#: ops a known condition may be computed with
PURE_OPS = ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "Cast",
            "Identity", "Squeeze", "Unsqueeze", "Reshape", "ReduceMax", "ReduceMin", "Shape", "Size")
_MAX_DEPTH = 8


class FoldConstantIfPass(ir.passes.InPlacePass):
    """Ifs with a known condition become their taken branch (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.folded: list[tuple[str, str]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.folded = []
        self._opset = model.opset_imports.get("", 17)
        changed = True
        while changed:
            changed = False
            for graph in (model.graph, *model.graph.subgraphs()):
                for node in list(graph):
                    if node.op_type == "If" and is_onnx(node) and self._fold(graph, node):
                        changed = True
                        break
                if changed:
                    break
        return ir.passes.PassResult(model, modified=bool(self.folded))

    def _fold(self, graph: ir.Graph, node: ir.Node) -> bool:
        cond = known_value(node.inputs[0], self._opset)
        if cond is None or cond.size != 1:
            return False
        taken = "then" if bool(cond.reshape(-1)[0]) else "else"
        branch = node.attributes[f"{taken}_branch"].as_graph()
        moved = list(branch)
        for inner in moved:
            branch.remove(inner)
            graph.insert_before(node, inner)
        for name in list(branch.initializers):
            graph.register_initializer(branch.initializers.pop(name))
        results = list(branch.outputs)
        branch.outputs.clear()
        for out, result in zip(node.outputs, results):
            if result.producer() not in moved:
                identity = ir.node("Identity", [result], name=f"{node.name or 'If'}_{out.name}_Identity")
                graph.insert_before(node, identity)
                result = identity.outputs[0]
            name = out.name
            out.replace_all_uses_with(result, replace_graph_outputs=True)
            out.name = None
            result.name = name
            result.type = out.type or result.type   # the If's declared output type and shape, if any
            result.shape = out.shape if out.shape is not None else result.shape
        graph.remove(node, safe=True)
        self.folded.append((node.name or "If", taken))
        return True


def known_value(value: ir.Value | None, opset: int = 17, depth: int = 0) -> np.ndarray | None:
    """The value of ``value`` when it is known before the model runs (module rules), else None."""
    if value is None or depth > _MAX_DEPTH:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or not is_onnx(node):
        return None
    if node.op_type == "Constant" and list(node.attributes) == ["value"]:
        return node.attributes["value"].as_tensor().numpy()
    if node.op_type not in PURE_OPS:
        return None
    args = [known_value(v, opset, depth + 1) if v is not None else None for v in node.inputs]
    if any(a is None for a, v in zip(args, node.inputs) if v is not None):
        return None
    return _evaluate(node, args, opset)


def _evaluate(node: ir.Node, args: list[np.ndarray | None], opset: int = 17) -> np.ndarray | None:
    """``node``'s first output on known inputs, by onnx's reference evaluator."""
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(args)]
    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend(["out"] + [f"unused{i}" for i in range(len(node.outputs) - 1)])
    try:
        evaluator = ReferenceEvaluator(onnx.helper.make_graph(
            [proto], "known", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                               for n in names if n],
            [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.UNDEFINED, None)]),
            opsets={"": opset})
        return np.asarray(evaluator.run(None, {n: a for n, a in zip(names, args) if n})[0])
    except Exception:
        return None
