"""Pass: MatMul / Gemm nodes with a low-bit weight take the form onnxruntime fuses into ``MatMulNBits``.

onnxruntime (``DQMatMulToMatMulNBits``, optimisation level *extended* and up) replaces
``DequantizeLinear(W) → MatMul`` with its fast ``MatMulNBits`` kernel only when the MatMul has no
activation Q/DQ on its input or output and ``W`` is input B with its blocks (or channels) laid
out ``[K, N]``. Otherwise the weight is dequantized on every run: measured at batch 1 on a
2048×2048 INT4 weight, 8.9 ms with activation Q/DQ around it against 0.05 ms fused (float: 0.68 ms).

onnxruntime 1.32's 2-bit ``MatMulNBits`` computes wrong results when ``N`` is not a multiple of 4
(measured: relative error 0.9–2.5 for N = 1, 10, 15, 17, 31, 33; 0.005 for N = 4, 8, 12, 20, 100).
Such INT2 weights go to :attr:`guarded` instead: the weight pass puts a no-op Reshape between
their DequantizeLinear and the MatMul (:func:`cet_onnx.quant.sizes.stored_form`, counted in its bytes), which onnxruntime does not fuse (correct, dequantized on
every run), and the node keeps its activation handling.

Rules, for every default-domain MatMul or Gemm whose input B is a 2-D quantized weight in
``qweights`` stored in blocks (INT8 blocks never fuse into QLinearMatMul / QGemm; any format with
``all_bits``, for a model without activation quantization), read by that node only (per-channel
INT4 / INT2 weights of a model with quantized activations run in onnxruntime's INT8 kernels instead,
widened at load: :mod:`.weight_qdq`, faster than ``MatMulNBits`` for more than one row; with
``low_bit_channels``, for runtimes without that widening, they take this form too):

* the node goes to :attr:`float_nodes` and its weight to :attr:`weights` (an INT2 one then keeps a
  per-channel scale, see :func:`cet_onnx.quant.sizes.stored_form`): the activation Q/DQ pass leaves its input and output float
  and the INT32 bias pass leaves its bias float (both read the set);
* a Gemm with ``transA=0`` and ``alpha=1`` becomes ``MatMul(A, W)`` (the node's name) followed, when
  it has a bias ``C`` (and ``beta=1``), by ``Add(·, C)`` (``<name>_bias_Add``): onnxruntime fuses a
  Gemm followed by Relu into ``FusedGemm`` before it looks for ``MatMulNBits``. With ``transB=1``
  ``W`` is stored transposed, ``[K, N]``: its entry in ``qweights`` becomes the exactly transposed
  codes and parameters (:meth:`QuantizedWeight.transposed`) and its initializer the transposed
  float tensor (computed only if read). Other Gemms stay as they are (and are not fused).
"""

from __future__ import annotations

from typing import MutableMapping

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import is_onnx, replace_node, uses_in
from cet_onnx.quant.quantizer import QuantizedWeight
from cet_onnx.quant.sizes import container_bits


class MatMulNBitsFormPass(ir.passes.InPlacePass):
    """Low-bit MatMul / Gemm weights in the form of ``MatMulNBits`` (see the module docstring)."""

    def __init__(self, qweights: MutableMapping[str, QuantizedWeight], all_bits: bool = False,
                 low_bit_channels: bool = False) -> None:
        super().__init__()
        self.qweights = qweights
        self.all_bits = all_bits
        self.low_bit_channels = low_bit_channels
        self.float_nodes: set[str] = set()
        self.weights: set[str] = set()   # the weights of those nodes
        self.guarded: set[str] = set()   # INT2 weights onnxruntime must not fuse (see the module docstring)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        modified = False
        for node in list(graph):
            w = self._weight(graph, node)
            if w is None:
                continue
            if self._faulty_int2(node, w):
                self.guarded.add(w.name)
                continue
            if node.op_type == "Gemm":
                if not self._convertible(node):
                    continue
                node = self._to_matmul(graph, names, node, w)
                modified = True
            self.float_nodes.add(node.name)
            self.weights.add(w.name)
        return ir.passes.PassResult(model, modified=modified or bool(self.float_nodes))

    def _weight(self, graph: ir.Graph, node: ir.Node) -> ir.Value | None:
        """Input B of a MatMul / Gemm when it is a 2-D low-bit quantized weight read by this node only."""
        if node.op_type not in ("MatMul", "Gemm") or not is_onnx(node) or len(node.inputs) < 2:
            return None
        w = node.inputs[1]
        qw = self.qweights.get(w.name) if w is not None and w.name else None
        if qw is None or not w.is_initializer() or qw.q.ndim != 2 or uses_in(graph, w) != 1:
            return None
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return None
        low_bit = self.low_bit_channels and container_bits(qw.fmt.bits) < 8
        return w if self.all_bits or low_bit or qw.block_size is not None else None

    def _faulty_int2(self, node: ir.Node, w: ir.Value) -> bool:
        """An INT2 weight with a number of output columns N that is not a multiple of 4."""
        qw = self.qweights[w.name]
        n = qw.q.shape[0] if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else qw.q.shape[1]
        return container_bits(qw.fmt.bits) == 2 and n % 4 != 0

    @staticmethod
    def _convertible(node: ir.Node) -> bool:
        has_bias = len(node.inputs) >= 3 and node.inputs[2] is not None
        return (node.attributes.get_float("alpha", 1.0) == 1.0
                and (not has_bias or node.attributes.get_float("beta", 1.0) == 1.0))

    def _to_matmul(self, graph: ir.Graph, names: UniqueNames, gemm: ir.Node, w: ir.Value) -> ir.Node:
        if gemm.attributes.get_int("transB", 0):
            self._transpose(w)
        matmul = ir.node("MatMul", [gemm.inputs[0], w], name=gemm.name)
        nodes = [matmul]
        if len(gemm.inputs) >= 3 and gemm.inputs[2] is not None:
            nodes.append(ir.node("Add", [matmul.outputs[0], gemm.inputs[2]], name=names.node(f"{gemm.name}_bias_Add")))
            matmul.outputs[0].name = names.value(f"{gemm.outputs[0].name}_matmul")
        replace_node(graph, gemm, nodes)
        return matmul

    def _transpose(self, w: ir.Value) -> None:
        qt = self.qweights[w.name].transposed()
        self.qweights[w.name] = qt
        old = w.const_value
        w.const_value = ir.LazyTensor(lambda: ir.Tensor(np.ascontiguousarray(old.numpy().T)),
                                      dtype=old.dtype, shape=ir.Shape(qt.q.shape), name=w.name)
        w.shape = ir.Shape(qt.q.shape)
