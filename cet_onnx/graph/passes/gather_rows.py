"""Pass: quantized embedding tables are looked up first and dequantized after (only the rows used).

``DequantizeLinear → Gather`` (what :mod:`.weight_qdq` writes for a ``Gather`` over a weight)
dequantizes the whole table on every run: onnxruntime 1.32 neither folds nor fuses it. Measured
on a 30522 × 384 table and 16 × 64 ids (2 cores, ``tools/gather_forms_bench.py``): float Gather
0.028 ms, DequantizeLinear → Gather 1.6 ms at INT8 per row and 11.5 ms at INT4 in blocks of 32;
the forms below 0.072 ms (INT8) and 1.3 ms (INT4).

Rules, for every default-domain ``Gather(T, ids)`` with ``axis`` 0 whose ``T`` is computed by a
weight ``DequantizeLinear`` of a rank-2 initializer:

* INT8, per row (``axis`` 0) or per tensor, zero points all 0: ``Gather(codes, ids)``, ``Cast``
  to float, times the scale (per row: ``Gather(scale, ids)`` unsqueezed on the last axis);
* INT4, in blocks along the rows (``axis`` 1, ``block_size`` a power of two ≥ 16):
  ``com.microsoft.GatherBlockQuantized(codes, ids, scale, zero_point)`` (``gather_axis`` 0,
  ``quantize_axis`` 1), a kernel of stock onnxruntime;
* any other form stays as it is (the allocator does not offer one:
  :func:`cet_onnx.quant.sizes.gather_format_ok`).

The Gather's output value keeps its name and uses; a DequantizeLinear nobody reads any more is
removed. New nodes are named after the Gather (``<name>_rows``, ``_Cast``, ...).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import initializer, is_onnx, remove_if_unread, replace_node
from cet_onnx.graph.tensors import array_tensor

MS_DOMAIN = "com.microsoft"


def _table_dequantize(node: ir.Node) -> ir.Node | None:
    table = node.inputs[0]
    dq = table.producer() if table is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or not is_onnx(dq) or len(dq.inputs) < 3:
        return None
    codes = dq.inputs[0]
    if not codes.is_initializer() or len(codes.shape or ()) != 2:
        return None
    return dq


class GatherRowsPass(ir.passes.InPlacePass):
    """Rewrites the lookups of the module docstring; ``converted`` lists the tables."""

    def __init__(self) -> None:
        super().__init__()
        self.converted: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        self.converted = []
        for node in list(graph):
            if node.op_type != "Gather" or not is_onnx(node) or node.attributes.get_int("axis", 0) != 0:
                continue
            dq = _table_dequantize(node)
            if dq is None:
                continue
            nodes = self._int8(graph, names, node, dq) or self._int4(model, names, node, dq)
            if not nodes:
                continue
            self.converted.append(node.inputs[0].name)
            replace_node(graph, node, nodes)
            remove_if_unread(graph, dq)
        return ir.passes.PassResult(model, modified=bool(self.converted))

    @staticmethod
    def _named(names: UniqueNames, base: str, op: str, inputs: list, suffix: str, domain: str = "",
               **attrs) -> ir.Node:
        return ir.node(op, inputs, attrs, domain=domain, outputs=[ir.Value(name=names.value(f"{base}_{suffix}_output"))],
                       name=names.node(f"{base}_{suffix}"))

    def _int8(self, graph: ir.Graph, names: UniqueNames, node: ir.Node, dq: ir.Node) -> list[ir.Node] | None:
        codes, scale, zero = dq.inputs[0], dq.inputs[1], dq.inputs[2]
        per_row = len(scale.shape or ()) == 1
        if codes.dtype != ir.DataType.INT8 or "block_size" in dq.attributes or (
                per_row and dq.attributes.get_int("axis", 1) != 0) or np.any(zero.const_value.numpy() != 0):
            return None
        base, ids = node.name or node.outputs[0].name, node.inputs[1]
        rows = self._named(names, base, "Gather", [codes, ids], "rows")
        cast = self._named(names, base, "Cast", [rows.outputs[0]], "Cast", to=dq.outputs[0].dtype or ir.DataType.FLOAT)
        if not per_row:
            return [rows, cast, self._named(names, base, "Mul", [cast.outputs[0], scale], "Mul")]
        row_scales = self._named(names, base, "Gather", [scale, ids], "row_scales")
        axes_name = names.value(f"{base}_last_axis")
        axes = initializer(graph, axes_name, array_tensor(axes_name, np.array([-1], np.int64)))
        col = self._named(names, base, "Unsqueeze", [row_scales.outputs[0], axes], "Unsqueeze")
        return [rows, cast, row_scales, col, self._named(names, base, "Mul", [cast.outputs[0], col.outputs[0]], "Mul")]

    def _int4(self, model: ir.Model, names: UniqueNames, node: ir.Node, dq: ir.Node) -> list[ir.Node] | None:
        codes = dq.inputs[0]
        block = dq.attributes.get_int("block_size", 0)
        if codes.dtype != ir.DataType.INT4 or dq.attributes.get_int("axis", 1) != 1 or block < 16 or block & (block - 1):
            return None
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        base = node.name or node.outputs[0].name
        return [self._named(names, base, "GatherBlockQuantized", [codes, node.inputs[1], dq.inputs[1], dq.inputs[2]],
                            "GatherBlockQuantized", domain=MS_DOMAIN, block_size=block, gather_axis=0,
                            quantize_axis=1)]
