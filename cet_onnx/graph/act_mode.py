"""Which activation mode a model gets: ``--act-mode auto|static|dynamic|none``.

``auto`` chooses by what the graph is, because static 8-bit activations destroy transformers
(attention scores, LayerNorm statistics, masks: measured cosine 0.3 on all-MiniLM-L6-v2 with
onnxruntime's ``quantize_static``) while run-time (dynamic) quantization of the MatMul inputs
keeps them (≈ 0.99), and CNNs are faster and as accurate with static QDQ (QLinearConv):

* ``dynamic`` when the graph has attention or LayerNorm: a LayerNormalization-family or
  attention op, a MatMul / Einsum of two activations (the ``Q·Kᵀ`` and ``P·V`` products; a Transpose of a
  weight, a tied LM head's, is no activation), or a
  decomposed LayerNorm (a ReduceMean whose output a Sub reads, or a mean taken as ReduceSum times a
  constant that, through Reshape / Expand, is subtracted from the tensor it was taken of: jax2tf /
  Keras exports such as Magika's);
* ``static`` otherwise.

The pipeline then checks one case further (:mod:`cet_onnx.allocation.static_trial`): a ``dynamic`` graph with
Conv weights, which dynamic mode runs dequantized, stays ``static`` where static 8-bit activations keep the
activation target on the probe samples.
"""

from __future__ import annotations

import onnx_ir as ir

from cet_onnx.graph.passes._graph import is_constant

ACT_MODES = ("auto", "static", "dynamic", "none")
#: ``--act-precision``: how static mode chooses each activation's precision (:mod:`cet_onnx.allocation.activation_plan`)
ACT_PRECISIONS = ("auto", "uniform", "solve")
_NORM_OR_ATTENTION = frozenset({
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
    "SkipSimplifiedLayerNormalization", "Attention", "MultiHeadAttention", "GroupQueryAttention",
})


def choose_act_mode(requested: str, graph: ir.Graph) -> tuple[str, str]:
    """(mode, why): ``requested`` itself, or for ``auto`` the mode the module docstring's rules give."""
    if requested != "auto":
        return requested, "as requested"
    found = transformer_evidence(graph)
    if found:
        return "dynamic", f"auto: {found}, a transformer: activations quantized at run time"
    return "static", "auto: no attention or LayerNorm in the graph"


def transformer_evidence(graph: ir.Graph) -> str | None:
    """A short description of the first attention / LayerNorm sign in ``graph``, or None."""
    for node in graph:
        if node.op_type in _NORM_OR_ATTENTION:
            return f"{node.op_type} '{node.name}'"
        if node.op_type in ("MatMul", "Einsum") and len(node.inputs) >= 2 and all(_activation(v) for v in node.inputs[:2]):
            return f"{node.op_type} '{node.name}' of two activations"
        if _mean_subtracted(node):
            return f"decomposed LayerNorm at '{node.name}'"
    return None


_PASS_THROUGH = frozenset({"Reshape", "Expand", "Unsqueeze", "Squeeze", "Cast", "Identity", "Mul", "Div"})


def _mean_subtracted(node: ir.Node, depth: int = 4) -> bool:
    """Whether ``node`` is the mean of a LayerNorm: ``x - mean(x)`` follows it."""
    if node.op_type == "ReduceMean" and any(u.node.op_type == "Sub" for u in node.outputs[0].uses()):
        return True
    if node.op_type not in ("ReduceMean", "ReduceSum") or not node.inputs or node.inputs[0] is None:
        return False
    source, frontier = node.inputs[0], [node.outputs[0]]
    for _ in range(depth):
        nxt = []
        for value in frontier:
            for use in value.uses():
                user = use.node
                if user.op_type == "Sub" and user.inputs[1] is value and user.inputs[0] is source:
                    return True
                if user.op_type in _PASS_THROUGH and (user.op_type not in ("Mul", "Div") or _scalar_scale(user, value)):
                    nxt.append(user.outputs[0])
        frontier = nxt
    return False


def _scalar_scale(node: ir.Node, value: ir.Value) -> bool:
    """A Mul / Div of ``value`` by a constant (the 1/n of a mean)."""
    other = [v for v in node.inputs if v is not value]
    return len(other) == 1 and not _activation(other[0])


def _activation(value: ir.Value | None) -> bool:
    """Computed from the graph inputs (not an initializer or a constant)."""
    if value is None or is_constant(value) or value.const_value is not None:
        return False
    producer = value.producer()
    return producer is None and value.is_graph_input() or producer is not None and producer.op_type not in (
        "Constant", "DequantizeLinear")
