"""Pass: feed weights as integer codes that the graph dequantizes, instead of as float32 arrays.

A whole-assignment evaluation (the closed loop, the fidelity check, the final measurement)
used to bind every weight's dequantized float32 copy at once: a second copy of the model's
weights, which set the peak memory of mixed precision on models whose weights stay on disk.
Fed as codes in int8 / uint8 containers (one byte per weight), the weights are dequantized by
onnxruntime while the model runs, one layer at a time.

Rules, for each weight ``W`` in ``forms`` (name → :class:`CodeForm`), where ``W`` is a float32
graph input (as :class:`~cet_onnx.graph.passes.probe_graph.ProbeGraphPass` leaves it):

* new graph inputs ``W_codes`` (the codes' type and shape), ``W_scale`` (float32) and
  ``W_zero_point`` (the codes' type), both of the scale's shape;
* ``W_DequantizeLinear`` computes the weight (``axis`` when the scale has one, ``block_size``
  for blocked scales); for a kernel whose codes are stored flattened (INT2 convolutions, see
  :func:`cet_onnx.quant.sizes.stored_form`) ``W_Reshape`` restores its shape from the int64
  initializer ``W_shape`` (the nodes of :func:`~.weight_qdq.dequantize_nodes`; names already
  taken get a numeric suffix). The result takes ``W``'s place, so its readers are untouched, and
  ``W`` stops being a graph input;
* a name that is not a graph input is an error. Blocked scales need opset 21: the caller
  imports it.

All three are graph inputs, not initializers: onnxruntime can neither fold a DequantizeLinear
into a float constant (the copy this pass exists to avoid) nor fuse it into a quantized kernel,
so the graph computes exactly what the probe graph computes with the dequantized weights
bound (DequantizeLinear and ``QuantizedWeight.dequantize`` both compute ``(q − zero_point) ·
scale`` in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import insert_front, take_over
from cet_onnx.graph.passes.weight_qdq import dequantize_nodes


@dataclass(frozen=True)
class CodeForm:
    """How one weight's codes are fed: their type and shape, the scale's shape, the DequantizeLinear attributes."""

    codes_dtype: np.dtype
    codes_shape: tuple[int, ...]
    scale_shape: tuple[int, ...]
    axis: int | None = None
    block_size: int | None = None
    reshape_to: tuple[int, ...] | None = None   # the weight's shape, when the codes are stored flattened

    def input_names(self, name: str) -> tuple[str, str, str]:
        """The graph inputs that carry weight ``name``: codes, scale, zero point."""
        return f"{name}_codes", f"{name}_scale", f"{name}_zero_point"


class DequantizeInputsPass(ir.passes.InPlacePass):
    """Float weight inputs become code inputs and a DequantizeLinear (see the module docstring)."""

    def __init__(self, forms: Mapping[str, CodeForm]) -> None:
        super().__init__()
        self.forms = forms

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = UniqueNames(graph)
        inputs = {v.name: v for v in graph.inputs}
        for name, form in self.forms.items():
            if name not in inputs:
                raise ValueError(f"'{name}' is not a graph input")
            insert_front(graph, self._dequantize(graph, names, inputs[name], form))
        return ir.passes.PassResult(model, modified=bool(self.forms))

    @staticmethod
    def _dequantize(graph: ir.Graph, names: UniqueNames, weight: ir.Value, form: CodeForm) -> list[ir.Node]:
        code_type = ir.DataType.from_numpy(np.dtype(form.codes_dtype))
        shapes = (form.codes_shape, form.scale_shape, form.scale_shape)
        types = (code_type, ir.DataType.FLOAT, code_type)
        fed = [ir.Value(name=n, type=ir.TensorType(t), shape=ir.Shape(s))
               for n, t, s in zip(form.input_names(weight.name), types, shapes)]
        graph.inputs.extend(fed)
        nodes, out = dequantize_nodes(graph, names, weight.name, fed, ir.DataType.FLOAT, form.axis, form.block_size,
                                      form.reshape_to)
        take_over(weight, out, graph)
        return nodes
