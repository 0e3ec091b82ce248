"""Pass: MatMul weights in the ``MatMulNBits`` form become ``com.microsoft.MatMulNBits`` nodes (``--emit-contrib``).

By default cet-onnx writes plain ONNX (``DequantizeLinear → MatMul``) and onnxruntime fuses it into
``MatMulNBits`` at load time (optimisation level *extended* and up). This pass writes the fused
node itself, for users who load with fewer optimisations or want no dependence on that fusion.

Rules, for every default-domain ``MatMul`` whose input B is an initializer named in ``names``
(the weights :class:`~.matmul_nbits_form.MatMulNBitsFormPass` put in that form, ``[K, N]``) and
read by that node only:

* the node becomes ``MatMulNBits(A, B, scales[, zero_points])`` (domain ``com.microsoft``, same
  name and output) with ``K``, ``N``, ``bits``, ``block_size`` and ``accuracy_level``; the arrays
  are :func:`cet_onnx.quant.matmul_nbits.nbits_arrays` of the weight's codes, scales in the
  weight's float type, in initializers ``W_nbits``, ``W_nbits_scales``, ``W_nbits_zero_points``;
* the float initializer ``W`` is removed and the weight recorded in :attr:`converted`, so that the
  weight pass leaves it alone;
* the model imports ``com.microsoft`` version 1.

INT2 weights with N not a multiple of 4 are never in ``names`` (onnxruntime 1.32's 2-bit kernel
is wrong for them, see :mod:`.matmul_nbits_form`).
"""

from __future__ import annotations

from typing import Collection, Mapping

import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import initializer, is_onnx, replace_node, uses_in
from cet_onnx.graph.tensors import array_tensor, float_numpy
from cet_onnx.quant.matmul_nbits import nbits_arrays
from cet_onnx.quant.quantizer import QuantizedWeight

DOMAIN = "com.microsoft"


class MatMulNBitsContribPass(ir.passes.InPlacePass):
    """Weights in the ``MatMulNBits`` form written as ``com.microsoft.MatMulNBits`` (see the module docstring)."""

    def __init__(self, qweights: Mapping[str, QuantizedWeight], names: Collection[str], accuracy_level: int) -> None:
        super().__init__()
        self.qweights, self.names, self.accuracy_level = qweights, set(names), accuracy_level
        self.converted: set[str] = set()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        for node in list(graph):
            w = node.inputs[1] if node.op_type == "MatMul" and is_onnx(node) and len(node.inputs) == 2 else None
            if w is None or w.name not in self.names or not w.is_initializer() or uses_in(graph, w) != 1:
                continue
            self._convert(graph, names, node, w)
        if self.converted:
            model.opset_imports.setdefault(DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(self.converted))

    def _convert(self, graph: ir.Graph, names: UniqueNames, node: ir.Node, w: ir.Value) -> None:
        a = nbits_arrays(self.qweights[w.name])
        ftype = float_numpy(w.dtype)
        inputs = [node.inputs[0],
                  initializer(graph, names.value(f"{w.name}_nbits"), array_tensor(f"{w.name}_nbits", a.b)),
                  initializer(graph, names.value(f"{w.name}_nbits_scales"),
                              array_tensor(f"{w.name}_nbits_scales", a.scales.astype(ftype)))]
        if a.zero_points is not None:
            inputs.append(initializer(graph, names.value(f"{w.name}_nbits_zero_points"),
                                      array_tensor(f"{w.name}_nbits_zero_points", a.zero_points)))
        fused = ir.node("MatMulNBits", inputs, domain=DOMAIN, name=node.name,
                        attributes={"K": a.k, "N": a.n, "bits": a.bits, "block_size": a.block_size,
                                    "accuracy_level": self.accuracy_level})
        replace_node(graph, node, [fused])
        graph.initializers.pop(w.name)
        self.converted.add(w.name)
