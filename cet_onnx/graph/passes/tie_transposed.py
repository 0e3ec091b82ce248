"""Pass: a 2-D initializer that is the exact transpose of another becomes a Transpose of it.

A language model whose output projection is tied to its embedding table (``lm_head.weight =
wte.weight``) reaches onnx as ``Gather(E)`` plus ``MatMul(x, Transpose(E))``. onnxsim folds that
Transpose into a second initializer, and torch's TorchScript exporter writes one to begin with,
so the table is stored twice and would be quantized twice, inconsistently. This pass ties the
copies again so the table is stored and quantized once, for both uses.

Rules:

* candidates are pairs of distinct 2-D float initializers ``A [m, n]`` and ``B [n, m]`` (at
  least ``MIN_ELEMENTS`` elements, same data type) that are not graph inputs, with
  ``B == Aᵀ`` exactly, element for element, ``A`` an embedding table (read by a Gather) and
  ``B`` read only as input 1 of MatMul / Gemm nodes (the folded copy of a tied LM head);
* ``B``'s uses all read ``Transpose(A, perm=[1, 0])`` instead, one node placed first in the
  graph; ``B`` is removed and its name moves to the Transpose output (so a graph output named
  ``B`` stays one);
* an initializer is tied at most once: when several are transposes of ``A``, each gets its own
  Transpose of ``A``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import take_over

#: Smaller tables are not worth the comparison (and could tie by chance: a 2×3 of zeros).
MIN_ELEMENTS = 1024

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _candidates(graph: ir.Graph) -> list[ir.Value]:
    inputs = {v.name for v in graph.inputs}
    out = []
    for name, value in graph.initializers.items():
        t = value.const_value
        if (t is not None and name not in inputs and len(t.shape) == 2 and t.dtype in _FLOATS
                and t.size >= MIN_ELEMENTS):
            out.append(value)
    return out


def _only_matmul_weight(value: ir.Value) -> bool:
    uses = list(value.uses())
    return bool(uses) and all(u.node.op_type in ("MatMul", "Gemm") and u.idx == 1 for u in uses)


def _embedding_table(value: ir.Value) -> bool:
    return any(u.node.op_type == "Gather" and u.idx == 0 for u in value.uses())


def transposed_pairs(graph: ir.Graph) -> list[tuple[ir.Value, ir.Value]]:
    """``(A, B)`` pairs of initializers with ``B == Aᵀ``, in initializer order of ``B``.

    Only the tables of a Gather are compared, each with the MatMul weights of the transposed
    shape: comparing reads both tensors (from disk, for a large model)."""
    values = _candidates(graph)
    by_shape: dict[tuple, list[ir.Value]] = {}
    for v in filter(_embedding_table, values):
        by_shape.setdefault((v.const_value.dtype, tuple(v.const_value.shape)), []).append(v)
    pairs, tied = [], set()
    for b in filter(_only_matmul_weight, values):
        t = b.const_value
        for a in by_shape.get((t.dtype, tuple(t.shape)[::-1]), []):
            if a is b or a.name in tied:
                continue
            if np.array_equal(a.const_value.numpy().T, t.numpy()):
                pairs.append((a, b))
                tied.add(b.name)
                break
    return pairs


class TieTransposedCopiesPass(ir.passes.InPlacePass):
    """Initializers equal to another's transpose become Transpose nodes of it; ``tied`` lists ``(A, B)`` names."""

    def __init__(self) -> None:
        super().__init__()
        self.tied: list[tuple[str, str]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        self.tied = []
        for a, b in transposed_pairs(graph):
            node = ir.node("Transpose", [a], attributes={"perm": [1, 0]},
                           name=names.node(f"{b.name}_Transpose"))
            out = node.outputs[0]
            out.type, out.shape = ir.TensorType(b.const_value.dtype), ir.Shape(b.const_value.shape)
            graph.insert_before(graph.node(0), node)   # B has readers, so the graph has nodes
            take_over(b, out, graph)
            self.tied.append((a.name, b.name))
        return ir.passes.PassResult(model, modified=bool(self.tied))
