"""Pass: LSTMs with INT8 weights become onnxruntime's ``com.microsoft.DynamicQuantizeLSTM``.

onnxruntime has no QDQ form of a recurrent op: ``DequantizeLinear → LSTM`` dequantizes ``W`` and ``R``
on every run and then runs the float kernel (slower than the float model). Its contrib
``DynamicQuantizeLSTM`` keeps them as INT8, quantizes the input at run time, and is what its own
``quantize_dynamic`` writes.

Rules, for every default-domain ``LSTM`` (any graph, If / Loop / Scan bodies included) whose ``W`` and
``R`` are both in ``qweights`` as INT8 with zero points 0 (symmetric), per output channel (axis 1) or
per tensor, and whose ``layout`` is 0:

* a ``DynamicQuantizeLSTM`` node (domain ``com.microsoft``, same name, attributes and outputs)
  replaces it, reading ``X, W, R, B, sequence_lens, initial_h, initial_c, P`` as the LSTM did, then
  ``W_scale, W_zero_point, R_scale, R_zero_point``;
* ``W`` and ``R`` become INT8 initializers ``W_quantized`` / ``R_quantized`` laid out
  ``[directions, input or hidden, 4·hidden]`` (the LSTM's own weights, transposed), with float32
  scales of shape ``[directions, 4·hidden]`` (per channel) or ``[directions]`` (per tensor) and INT8
  zero points of the same shape; the float initializers are dropped;
* the converted weights leave ``qweights`` (``converted`` lists them), so no DequantizeLinear is written.

A model with such a node needs onnxruntime (the ``com.microsoft`` domain, version 1, is imported).
"""

from __future__ import annotations

from typing import MutableMapping

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import all_nodes, home_graph, initializer, is_onnx
from cet_onnx.graph.tensors import array_tensor
from cet_onnx.quant.quantizer import QuantizedWeight
from cet_onnx.quant.sizes import container_bits

_DOMAIN = "com.microsoft"


class DynamicLSTMPass(ir.passes.InPlacePass):
    """INT8 LSTMs become ``DynamicQuantizeLSTM`` (module docstring); ``converted`` lists their weights."""

    def __init__(self, qweights: MutableMapping[str, QuantizedWeight]) -> None:
        super().__init__()
        self.qweights = qweights
        self.converted: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = model.graph
        names = UniqueNames(main)
        self.converted = []
        for node in all_nodes(main):
            if node.op_type != "LSTM" or not is_onnx(node) or node.attributes.get_int("layout", 0) != 0:
                continue
            w, r = (node.inputs[k] if len(node.inputs) > k else None for k in (1, 2))
            if w is None or r is None or not all(_convertible(self.qweights.get(v.name)) for v in (w, r)):
                continue
            self._convert(main, node, names)
        if self.converted:
            model.opset_imports.setdefault(_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(self.converted))

    def _convert(self, main: ir.Graph, node: ir.Node, names: UniqueNames) -> None:
        graph = node.graph
        inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
        params = []
        for k in (1, 2):
            value = inputs[k]
            qw = self.qweights.pop(value.name)
            home = home_graph(main, value)
            codes, scale = _lstm_layout(qw)
            made = []
            for suffix, array in (("quantized", codes), ("scale", scale), ("zero_point", np.zeros(scale.shape, np.int8))):
                fresh = names.value(f"{value.name}_{suffix}")
                made.append(initializer(home, fresh, array_tensor(fresh, array)))
            inputs[k] = made[0]
            params += made[1:]
            self.converted.append(value.name)
        attrs = {a.name: a for a in node.attributes.values() if a.name != "layout"}
        new = ir.node("DynamicQuantizeLSTM", [*inputs[:8], *params], attrs, domain=_DOMAIN, version=1,
                      num_outputs=len(node.outputs), name=node.name)
        graph.insert_before(node, new)
        for old, out in zip(node.outputs, new.outputs):
            name, out.type, out.shape = old.name, old.type, old.shape
            old.replace_all_uses_with(out, replace_graph_outputs=True)
            old.name = None
            out.name = name
        graph.remove(node, safe=True)
        for name in self.converted[-2:]:
            if name in main.initializers and not main.initializers[name].uses():
                main.initializers.pop(name)


def _convertible(qw: QuantizedWeight | None) -> bool:
    return (qw is not None and container_bits(qw.fmt.bits) == 8 and qw.block_size is None and qw.q.ndim == 3
            and qw.axis in (None, 1) and not np.any(qw.zero_point))


def _lstm_layout(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``[directions, rows, 4·hidden]`` (int8) and scales ``[directions, 4·hidden]`` or ``[directions]``."""
    codes = np.ascontiguousarray(np.transpose(qw.q, (0, 2, 1))).astype(np.int8)
    dirs, gates = qw.q.shape[0], qw.q.shape[1]
    scale = np.asarray(qw.scale, np.float32)
    if qw.axis is None:
        return codes, np.full(dirs, float(scale.reshape(-1)[0]), np.float32)
    return codes, np.ascontiguousarray(np.broadcast_to(scale.reshape(1, gates), (dirs, gates)))
