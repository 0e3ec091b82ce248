"""Pass: MatMuls with an INT8 weight quantize their activation at run time (dynamic quantization).

Rules, for every default-domain ``MatMul(A, B)`` in graph order where

* ``B`` is computed by a ``DequantizeLinear`` of an INT8 / UINT8 initializer of rank 2 (as
  :mod:`.weight_qdq` writes it), per tensor or per column (``axis`` 1 or -1), without
  ``block_size`` (MatMulInteger has no blocked form), and
* ``A`` is a float32 tensor that is not an initializer,

the MatMul is replaced by the standard ONNX form that onnxruntime fuses into its dynamic
quantized MatMul kernel (``MatMulIntegerToFloat``, then ``DynamicQuantizeMatMul``)::

    A_q, A_scale, A_zero = DynamicQuantizeLinear(A)
    Y_int  = MatMulInteger(A_q, B_codes, A_zero, B_zero_point)
    Y      = Mul(Cast(Y_int, float), Mul(A_scale, B_scale))

``Y`` keeps the MatMul's output value (name, type and uses). A weight DequantizeLinear that no
node reads any more is removed. Nodes are named after the MatMul (``<name>_DynamicQuantizeLinear``,
``_MatMulInteger``, ``_Cast``, ``_ScaleMul``, ``_Mul``); taken names get a numeric suffix.
Sub-8-bit and blocked weights keep their weight-only DequantizeLinear: their fast kernel is a
different one (``MatMulNBits``), which needs float activations.
"""

from __future__ import annotations

import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import is_onnx

_INT8 = (ir.DataType.INT8, ir.DataType.UINT8)


def int8_weight_dequantize(value: ir.Value | None) -> ir.Node | None:
    """The weight DequantizeLinear computing ``value``, when MatMulInteger can take its codes directly."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or not is_onnx(dq) or len(dq.inputs) < 3:
        return None
    codes = dq.inputs[0]
    if codes is None or not codes.is_initializer() or codes.dtype not in _INT8 or len(codes.shape or ()) != 2:
        return None
    if "block_size" in dq.attributes and dq.attributes["block_size"].as_int() != 0:
        return None
    per_column = dq.inputs[1].shape is not None and len(dq.inputs[1].shape) == 1
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    if per_column and axis not in (1, -1):
        return None
    return dq


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
        for node in list(graph):
            if node.op_type != "MatMul" or not is_onnx(node) or not _float_activation(node.inputs[0]):
                continue
            dq = int8_weight_dequantize(node.inputs[1])
            if dq is None:
                continue
            nodes = self._dynamic(names, node, dq)
            graph.insert_before(node, nodes)
            self.converted.append(node.name or node.outputs[0].name)
            y, out = node.outputs[0], nodes[-1].outputs[0]
            y.replace_all_uses_with(out, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            out.name, out.type, out.shape = y.name, y.type, y.shape
            if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
                graph.remove(dq, safe=True)
        return ir.passes.PassResult(model, modified=bool(self.converted))

    def _dynamic(self, names: UniqueNames, node: ir.Node, dq: ir.Node) -> list[ir.Node]:
        base = node.name or node.outputs[0].name
        codes, scale, zero = dq.inputs[0], dq.inputs[1], dq.inputs[2]

        def named(op: str, inputs: list, suffix: str, n_out: int = 1, **attrs) -> ir.Node:
            outs = [ir.Value(name=names.value(f"{base}_{suffix}_output_{k}")) for k in range(n_out)]
            return ir.node(op, inputs, attrs, outputs=outs, name=names.node(f"{base}_{suffix}"))

        dql = named("DynamicQuantizeLinear", [node.inputs[0]], "DynamicQuantizeLinear", 3)
        a_q, a_scale, a_zero = dql.outputs
        mmi = named("MatMulInteger", [a_q, codes, a_zero, zero], "MatMulInteger")
        cast = named("Cast", [mmi.outputs[0]], "Cast", to=ir.DataType.FLOAT)
        scales = named("Mul", [a_scale, scale], "ScaleMul")
        return [dql, mmi, cast, scales, named("Mul", [cast.outputs[0], scales.outputs[0]], "Mul")]
