"""What each graph output means, read off the ops that compute it: the loss and the metrics follow it.

Kinds, by the last op that changes values (shape-only ops such as Reshape, Squeeze, Flatten,
Identity, Cast and Transpose are looked through):

* ``probabilities``: Softmax / LogSoftmax / Sigmoid, or a decomposed softmax (a Div of an Exp by a sum);
* ``embedding``: an L2 normalisation (LpNormalization, or a Div / Mul by a norm computed with
  ReduceL2, Sqrt, or a Clip / Max of one), a pooling over tokens (ReduceMean / ReduceSum / ReduceMax,
  or a Div of a ReduceSum: masked mean pooling), a LayerNorm (a transformer's last hidden state),
  or Tanh (a BERT pooler);
* ``logits``: Gemm / MatMul / Conv (with or without a bias Add): class or per-token scores;
* ``tensor``: anything else (regression outputs, integers, ...).
"""

from __future__ import annotations

import onnx_ir as ir

KINDS = ("probabilities", "embedding", "logits", "tensor")
_SHAPE_ONLY = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Transpose"})
_PROBABILITIES = frozenset({"Softmax", "LogSoftmax", "Sigmoid"})
_POOLING = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "GlobalAveragePool"})
_NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                    "RMSNormalization", "LpNormalization"})
_LINEAR = frozenset({"Gemm", "MatMul", "Conv", "ConvTranspose", "MatMulNBits", "Einsum"})


def output_kinds(graph: ir.Graph) -> dict[str, str]:
    """Every graph output's kind (module docstring)."""
    return {v.name: output_kind(v) for v in graph.outputs}


def output_kind(value: ir.Value) -> str:
    """The kind of one output value."""
    if value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
        return "tensor"
    node = _value_producer(value)
    if node is None:
        return "tensor"
    op = node.op_type
    if op in _PROBABILITIES or op == "Div" and _is_exp(node.inputs[0]) and _is_norm_or_pool(node.inputs[1]):
        return "probabilities"
    if op in _NORMS or op in _POOLING or op == "Tanh":
        return "embedding"
    if op in ("Div", "Mul") and _is_norm_or_pool(node.inputs[1]) or op == "Div" and _is_pool(node.inputs[0]):
        return "embedding"
    if op in _LINEAR:
        return "logits"
    if op == "Add" and any(_value_producer(v) is not None and _value_producer(v).op_type in _LINEAR
                           for v in node.inputs):
        return "logits"
    return "tensor"


def _value_producer(value: ir.Value | None) -> ir.Node | None:
    """The producer of ``value``, looking through shape-only ops."""
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in _SHAPE_ONLY and node.inputs and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    return node


def _is_norm_or_pool(value: ir.Value | None, depth: int = 4) -> bool:
    """Whether ``value`` is a vector norm (ReduceL2, Sqrt of a sum of squares, clipped) or a count."""
    node = _value_producer(value)
    for _ in range(depth):
        if node is None:
            return False
        if node.op_type in ("ReduceL2", "Sqrt", "ReduceSum", "ReduceSumSquare"):
            return True
        if node.op_type not in ("Clip", "Max", "Expand", "Reciprocal", "Add"):
            return False
        node = _value_producer(node.inputs[0])
    return False


def _is_exp(value: ir.Value | None) -> bool:
    node = _value_producer(value)
    return node is not None and node.op_type == "Exp"


def _is_pool(value: ir.Value | None) -> bool:
    node = _value_producer(value)
    return node is not None and node.op_type in _POOLING
