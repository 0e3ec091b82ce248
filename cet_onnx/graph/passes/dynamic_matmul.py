"""Pass: MatMuls and Gemms with an INT8 weight quantize their activation at run time (dynamic quantization).

Rules, for every default-domain ``MatMul(A, B)`` in graph order where

* ``B`` is computed by a ``DequantizeLinear`` of an INT8 initializer of rank 2, or of INT4 / INT2
  codes widened to INT8 by a ``Cast`` (as :mod:`.weight_qdq` writes them), per tensor or per column (``axis`` 1 or -1), without
  ``block_size`` (MatMulInteger has no blocked form), and
* ``A`` is a float32 tensor that is not an initializer,

or ``B`` is a 2-D ``Transpose`` of such a weight (per row, ``axis`` 0), and for every
``Gemm(A, B, C)`` with ``transA`` 0 and ``alpha`` / ``beta`` 1 whose ``B`` is such a weight
(``transB`` 0), or its transpose (``transB`` 1: per row, ``axis`` 0), and whose ``C`` is absent
or an initializer,

the MatMul is replaced by the standard ONNX form that onnxruntime fuses into its dynamic
quantized MatMul kernel (``MatMulIntegerToFloat``, then ``DynamicQuantizeMatMul``)::

    A_q, A_scale, A_zero = DynamicQuantizeLinear(A)
    Y_int  = MatMulInteger(A_q, B_codes, A_zero, B_zero_point)
    Y      = Mul(Cast(Y_int, float), Mul(A_scale, B_scale))

and a Gemm's ``C`` is added to ``Y`` (``<name>_Add``). Transposed weights give MatMulInteger
their codes transposed: stored so in a new initializer ``<codes>_transposed`` when this node is
their only reader, else (a table tied to a Gather, a weight of several nodes) read through an
int8 ``<codes>_Transpose`` node, which onnxruntime folds at load, so the file keeps one copy (widened codes always take this route). Nodes reading the same ``A`` share one
DynamicQuantizeLinear (the first one's). ``Y`` keeps the node's output value (name,
type and uses). A weight DequantizeLinear that no node reads any more is removed, and so are
codes that no node reads. Nodes are named after the MatMul (``<name>_DynamicQuantizeLinear``,
``_MatMulInteger``, ``_Cast``, ``_ScaleMul``, ``_Mul``); taken names get a numeric suffix.
Blocked weights keep their weight-only DequantizeLinear: their fast kernel is a
different one (``MatMulNBits``), which needs float activations.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import initializer, is_onnx, remove_if_unread, replace_node
from cet_onnx.graph.tensors import int_tensor

_INT8 = (ir.DataType.INT8,)   # what weight_qdq writes


def int8_weight_dequantize(value: ir.Value | None, column_axis: int = 1) -> ir.Node | None:
    """The weight DequantizeLinear computing ``value``, when MatMulInteger can take its codes directly
    (``column_axis``: the axis of the output columns, 0 for a Gemm with ``transB``)."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or not is_onnx(dq) or len(dq.inputs) < 2:
        return None
    codes = dq.inputs[0]
    if codes is None or codes.dtype not in _INT8 or len(codes.shape or ()) != 2 or not _stored_codes(codes):
        return None
    if "block_size" in dq.attributes and dq.attributes["block_size"].as_int() != 0:
        return None
    per_column = dq.inputs[1].shape is not None and len(dq.inputs[1].shape) == 1
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    if per_column and axis % 2 != column_axis:
        return None
    return dq


_WIDENING = ("Cast", "Reshape", "Sub")


def _stored_codes(codes: ir.Value) -> bool:
    """Whether ``codes`` is an initializer, or computed from initializers only by the Cast / Reshape /
    Sub nodes that widen narrow codes to INT8 (:mod:`.weight_qdq`): a constant onnxruntime folds at load."""
    if codes.is_initializer():
        return True
    node = codes.producer()
    return (node is not None and node.op_type in _WIDENING and is_onnx(node) and all(v is not None and _stored_codes(v) for v in node.inputs))


def _drop_unread(graph: ir.Graph, value: ir.Value) -> None:
    """Remove ``value`` when nothing reads it: its initializer, or its producer and, in turn, what only that read."""
    if value.uses() or value.is_graph_output():
        return
    if value.is_initializer():
        graph.initializers.pop(value.name)
        return
    node = value.producer()
    if node is not None and remove_if_unread(graph, node):
        for v in node.inputs:
            if v is not None:
                _drop_unread(graph, v)


def _matmul_weight(b: ir.Value | None) -> tuple[ir.Node | None, bool]:
    """(weight DequantizeLinear, whether B is its transpose) of a MatMul's ``B``."""
    t = b.producer() if b is not None else None
    if t is not None and t.op_type == "Transpose" and is_onnx(t) and list(t.attributes.get_ints("perm", [1, 0])) == [1, 0]:
        return int8_weight_dequantize(t.inputs[0], column_axis=0), True
    return int8_weight_dequantize(b), False


def _gemm_weight(node: ir.Node) -> tuple[ir.Node, bool] | None:
    """(weight DequantizeLinear, transB) of a Gemm the rules convert, or None."""
    attr = {k: v.value for k, v in node.attributes.items()}
    if attr.get("transA", 0) != 0 or attr.get("alpha", 1.0) != 1.0 or attr.get("beta", 1.0) != 1.0:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not bias.is_initializer():
        return None
    trans_b = bool(attr.get("transB", 0))
    dq = int8_weight_dequantize(node.inputs[1], column_axis=0 if trans_b else 1)
    return None if dq is None else (dq, trans_b)


def _float_activation(value: ir.Value | None) -> bool:
    return value is not None and not value.is_initializer() and value.dtype == ir.DataType.FLOAT


class DynamicMatMulPass(ir.passes.InPlacePass):
    """Rewrites the MatMuls of the module docstring; ``converted`` lists their names."""

    def __init__(self) -> None:
        super().__init__()
        self.converted: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        self.converted = []
        self._quantized_inputs: dict[ir.Value, ir.Node] = {}
        for node in list(graph):
            if node.op_type not in ("MatMul", "Gemm") or not is_onnx(node) or not _float_activation(node.inputs[0]):
                continue
            found = _matmul_weight(node.inputs[1]) if node.op_type == "MatMul" else _gemm_weight(node)
            if found is None or found[0] is None:
                continue
            dq, trans_b = found
            pre, codes = _transposed_codes(graph, names, dq) if trans_b else ([], dq.inputs[0])
            bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
            self.converted.append(node.name or node.outputs[0].name)
            transpose = node.inputs[1].producer() if trans_b and node.op_type == "MatMul" else None
            replace_node(graph, node, pre + self._dynamic(names, node, dq, codes, bias))
            if transpose is not None:
                remove_if_unread(graph, transpose)
            old_codes = dq.inputs[0]
            if remove_if_unread(graph, dq):
                _drop_unread(graph, old_codes)
        return ir.passes.PassResult(model, modified=bool(self.converted))

    def _dynamic(self, names: UniqueNames, node: ir.Node, dq: ir.Node, codes: ir.Value,
                 bias: ir.Value | None) -> list[ir.Node]:
        base = node.name or node.outputs[0].name
        scale, zero = dq.inputs[1], dq.inputs[2] if len(dq.inputs) > 2 else None

        def named(op: str, inputs: list, suffix: str, n_out: int = 1, **attrs) -> ir.Node:
            outs = [ir.Value(name=names.value(f"{base}_{suffix}_output_{k}")) for k in range(n_out)]
            return ir.node(op, inputs, attrs, outputs=outs, name=names.node(f"{base}_{suffix}"))

        dql = self._quantized_inputs.get(node.inputs[0])
        shared = dql is not None
        if not shared:
            dql = self._quantized_inputs[node.inputs[0]] = named("DynamicQuantizeLinear", [node.inputs[0]],
                                                                 "DynamicQuantizeLinear", 3)
        a_q, a_scale, a_zero = dql.outputs
        mmi = named("MatMulInteger", [a_q, codes, a_zero, zero], "MatMulInteger")
        cast = named("Cast", [mmi.outputs[0]], "Cast", to=ir.DataType.FLOAT)
        scales = named("Mul", [a_scale, scale], "ScaleMul")
        nodes = [*([] if shared else [dql]), mmi, cast, scales, named("Mul", [cast.outputs[0], scales.outputs[0]], "Mul")]
        if bias is not None:
            nodes.append(named("Add", [nodes[-1].outputs[0], bias], "Add"))
        return nodes


def _transposed_codes(graph: ir.Graph, names: UniqueNames, dq: ir.Node) -> tuple[list[ir.Node], ir.Value]:
    """(nodes to insert, the codes of ``dq`` transposed, ``[N, K]`` → ``[K, N]``).

    When this node is the codes' only reader, a new initializer ``<codes>_transposed`` holds
    them transposed (the original is removed after). Codes read elsewhere too (a table tied
    to a Gather, a weight of several MatMuls) go through an int8 ``<codes>_Transpose`` node,
    which onnxruntime folds at load, so the file keeps one copy (widened codes always take this route)."""
    codes = dq.inputs[0]
    if codes.is_initializer() and len(codes.uses()) == 1 and len(dq.outputs[0].uses()) == 1:
        name = names.value(f"{codes.name}_transposed")
        q = np.ascontiguousarray(codes.const_value.numpy().T)
        return [], initializer(graph, name, int_tensor(name, q, 8))
    node = ir.node("Transpose", [codes], {"perm": [1, 0]}, name=names.node(f"{codes.name}_Transpose"))
    return [node], node.outputs[0]
