"""Pass: store each quantized weight as packed integer codes followed by DequantizeLinear.

Rules, for every weight ``W`` in the plan (in plan order):

* initializers ``W_quantized`` (the codes, packed as INT8 / INT4 / INT2), ``W_scale`` (float32;
  float16 / bfloat16 for a weight of that type) and ``W_zero_point`` (same integer type as the
  codes) replace ``W``;
* a ``DequantizeLinear`` node ``W_DequantizeLinear`` computes the float weight into a tensor
  that keeps the name ``W``, so the consumers are untouched. Per-channel weights set ``axis``;
  block-wise ones set ``axis`` and ``block_size`` (opset 21);
* INT2 weights are written in the blocked form (except those in ``plain_int2``: MatMul weights that run
  as ``MatMulNBits``, :mod:`.matmul_nbits_form`, keep a per-channel scale); a 2-D INT2 weight whose output channels are not a multiple of 4
  (onnxruntime's 2-bit ``MatMulNBits`` gets them wrong) is reshaped to its own shape after
  dequantization (``W_dequantized_2d``, ``W_Reshape``, ``W_shape``), which stops that fusion (:func:`cet_onnx.quant.sizes.stored_form`):
  a per-channel or per-tensor scale becomes one block spanning the whole reduction axis, and a
  Conv kernel is dequantized flattened to 2-D into ``W_dequantized_2d`` and reshaped back by
  ``W_Reshape`` to the shape in initializer ``W_shape``. onnxruntime's QDQ selectors exclude 4-
  and 16-bit weights but not 2-bit ones, fuse INT2 weights into QLinearConv / QLinearMatMul and
  then refuse to load the model; they never fuse blocked scales.

* weights in ``int8_codes`` (per-channel or per-tensor INT4 / INT2 weights of Conv / MatMul / Gemm nodes
  in a model with quantized activations, :func:`int8_kernel_weights`) keep their narrow codes and zero
  point in the file, each widened by a ``Cast`` to INT8 (``W_quantized_Cast``, ``W_zero_point_Cast``;
  an INT2 kernel stored flattened is reshaped back *before* dequantization, ``W_Reshape``) ahead of
  a per-channel INT8 ``DequantizeLinear``. A Conv weight with a non-zero zero point has it subtracted
  instead (``W_Sub`` in INT32, then ``W_centred_Cast`` to INT8, the zero point stored broadcastable
  against the codes; no zero point on the DequantizeLinear): measured on the digits model,
  ``QLinearConv`` with INT4-range weight zero points ran 2.2× FP32 against 0.9× with them folded.
  QGemm does not fuse without a weight zero point, so MatMul / Gemm weights keep theirs. onnxruntime folds the Casts at load (constant folding runs
  before its QDQ fusions), so the layer runs in its INT8 kernel (``QLinearConv``, ``QLinearMatMul``,
  ``DynamicQuantizeMatMul``) instead of dequantizing the weight on every run. Bytes are those of the
  plain form (:func:`cet_onnx.quant.sizes.stored_form`).

The new nodes go to the front of the graph (they read initializers only); a name already
taken gets a numeric suffix. A weight that was also a graph input stops being one. A weight read
only inside one If / Loop / Scan body (:mod:`.lift_subgraph_weights`) gets its initializers and
nodes at the front of that body instead, where onnxruntime's QDQ fusions look for them.
"""

from __future__ import annotations

from typing import Collection, Mapping

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import home_graph, initializer, insert_front, is_onnx, take_over
from cet_onnx.graph.tensors import array_tensor, float_numpy, int_tensor
from cet_onnx.quant.quantizer import QuantizedWeight
from cet_onnx.quant.sizes import StoredForm, container_bits, stored_form


class WeightQDQPass(ir.passes.InPlacePass):
    """Quantized weights become packed initializers and DequantizeLinear (see the module docstring)."""

    def __init__(self, qweights: Mapping[str, QuantizedWeight], plain_int2: Collection[str] = (),
                 int8_codes: Collection[str] = ()) -> None:
        super().__init__()
        self.qweights = qweights
        self.plain_int2 = frozenset(plain_int2)
        self.int8_codes = frozenset(int8_codes)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        for name, qw in self.qweights.items():
            home = home_graph(graph, graph.initializers[name])
            form = "int8" if name in self.int8_codes else "nbits" if name in self.plain_int2 else "qdq"
            insert_front(home, self._dequantize(graph, home, names, name, qw, form))
        return ir.passes.PassResult(model, modified=bool(self.qweights))

    @staticmethod
    def _dequantize(graph: ir.Graph, home: ir.Graph, names: UniqueNames, name: str, qw: QuantizedWeight,
                    form: StoredForm = "qdq") -> list[ir.Node]:
        q, scale, zp, axis, block, reshape = stored_form(qw, form)
        dtype = graph.initializers[name].dtype
        reshape_to = tuple(qw.q.shape) if reshape else None
        shifted = form == "int8" and bool(np.any(zp != 0)) and _conv_only(graph.initializers[name])
        if shifted:   # subtracted from the codes at load: QLinearConv is fastest with a zero weight zero point
            view = [1] * qw.q.ndim
            if axis is not None:   # per tensor: one zero point, broadcast over everything
                view[axis] = -1
            zp = zp.reshape(view)
        inputs = []
        for suffix, tensor in (("quantized", lambda n: int_tensor(n, q, qw.fmt.bits)),
                               ("scale", lambda n: array_tensor(n, scale.astype(float_numpy(dtype)))),
                               ("zero_point", lambda n: int_tensor(n, zp, qw.fmt.bits))):
            fresh = names.value(f"{name}_{suffix}")
            inputs.append(initializer(home, fresh, tensor(fresh)))
        if form == "int8":
            widen, inputs = _widened(home, names, name, inputs, reshape_to, shifted)
            nodes, out = dequantize_nodes(home, names, name, inputs, dtype, axis, block, None)
            nodes = widen + nodes
        else:
            nodes, out = dequantize_nodes(home, names, name, inputs, dtype, axis, block, reshape_to)
        take_over(graph.initializers[name], out, graph)
        return nodes


def dequantize_nodes(graph: ir.Graph, names: UniqueNames, name: str, inputs: list[ir.Value], dtype: ir.DataType,
                     axis: int | None, block: int | None,
                     reshape_to: tuple[int, ...] | None) -> tuple[list[ir.Node], ir.Value]:
    """``name_DequantizeLinear`` of ``inputs`` (codes, scale, zero point) with ``axis`` / ``block_size``,
    then, for codes stored flattened, ``name_Reshape`` back to ``reshape_to`` (int64 initializer
    ``name_shape``); the nodes and the value that computes weight ``name`` (type ``dtype``)."""
    attrs = {k: int(v) for k, v in (("axis", axis), ("block_size", block)) if v is not None}
    dq = ir.node("DequantizeLinear", inputs, attrs, name=names.node(f"{name}_DequantizeLinear"))
    nodes = [dq]
    out = dq.outputs[0]
    out.dtype = dtype
    if reshape_to is not None:
        out.name = names.value(f"{name}_dequantized_2d")
        nodes.append(ir.node("Reshape", [out, _shape(graph, names, name, reshape_to)], name=names.node(f"{name}_Reshape")))
        out = nodes[-1].outputs[0]
        out.dtype = dtype
    return nodes, out


def _shape(graph: ir.Graph, names: UniqueNames, name: str, shape: tuple[int, ...]) -> ir.Value:
    """The int64 initializer ``name_shape`` holding ``shape``, the target of a weight's Reshape."""
    fresh = names.value(f"{name}_shape")
    return initializer(graph, fresh, array_tensor(fresh, np.array(shape, np.int64)))


def int8_kernel_weights(graph: ir.Graph, qweights: Mapping[str, QuantizedWeight],
                        exclude: Collection[str]) -> set[str]:
    """The weights :class:`WeightQDQPass` widens to INT8 (``int8_codes``): stored in INT4 / INT2 per channel
    or per tensor, read only as the weight (input 1) of Conv, MatMul or Gemm nodes, and not in ``exclude``
    (those that run as ``MatMulNBits``). Call it only when activations are quantized (static or dynamic):
    without activation Q/DQ no INT8 kernel runs the layer."""
    chosen = set()
    for name, qw in qweights.items():
        value = graph.initializers.get(name)
        if (value is None or name in exclude or qw.block_size is not None or container_bits(qw.fmt.bits) == 8
                or not value.uses() or value.is_graph_output()):
            continue
        if all(use.node.op_type in ("Conv", "MatMul", "Gemm") and is_onnx(use.node) and use.idx == 1
               for use in value.uses()):
            chosen.add(name)
    return chosen


def _conv_only(value: ir.Value) -> bool:
    return all(use.node.op_type == "Conv" for use in value.uses())


def _widened(graph: ir.Graph, names: UniqueNames, name: str, inputs: list[ir.Value],
             reshape_to: tuple[int, ...] | None, shifted: bool) -> tuple[list[ir.Node], list[ir.Value]]:
    """The nodes that widen the codes to INT8 and the DequantizeLinear inputs that read them.

    Codes ``q`` and zero point ``z`` become ``Cast(q)`` and ``Cast(z)``; with ``shifted`` (a non-zero
    ``z``, stored broadcastable against the codes) ``Cast(Cast(q, int32) − Cast(z, int32), int8)`` and no
    zero point (|q − z| ≤ 15 fits). ``reshape_to``: the codes' shape after the Cast (an INT2 kernel is stored flattened)."""
    codes, scale, zero = inputs
    nodes: list[ir.Node] = []

    def add(op: str, ins: list[ir.Value], suffix: str, dtype: ir.DataType, shape, **attrs) -> ir.Value:
        nodes.append(ir.node(op, ins, attrs, name=names.node(f"{name}_{suffix}")))
        out = nodes[-1].outputs[0]
        out.name, out.dtype, out.shape = names.value(f"{name}_{suffix}_output"), dtype, ir.Shape(shape)
        return out

    wide = ir.DataType.INT32 if shifted else ir.DataType.INT8
    codes8 = add("Cast", [codes], "quantized_Cast", wide, codes.shape, to=wide)
    if reshape_to is not None:
        codes8 = add("Reshape", [codes8, _shape(graph, names, name, reshape_to)], "Reshape", wide, reshape_to)
    if not shifted:
        return nodes, [codes8, scale, add("Cast", [zero], "zero_point_Cast", wide, zero.shape, to=wide)]
    zero32 = add("Cast", [zero], "zero_point_Cast", wide, zero.shape, to=wide)
    centred = add("Sub", [codes8, zero32], "Sub", wide, codes8.shape)
    return nodes, [add("Cast", [centred], "centred_Cast", ir.DataType.INT8, codes8.shape, to=ir.DataType.INT8), scale]
