"""Rewrite a float graph into onnxruntime's QDQ format.

Rules:

1. Each quantized weight ``W`` becomes a packed integer initializer ``W_quantized``
   (INT8 / INT4 / INT2), a float32 ``W_scale`` and a zero point ``W_zero_point`` of the same
   integer type, followed by ``DequantizeLinear`` whose output keeps the name ``W``; so the
   consumers are untouched. Per-channel weights set ``axis``; block-wise ones set ``axis``
   and ``block_size`` (opset 21). INT2 weights are always written in the blocked form
   (a per-channel or per-tensor scale becomes one block spanning the whole reduction axis,
   and a Conv kernel is stored flattened to 2-D and reshaped back): onnxruntime's QDQ
   selectors exclude 4- and 16-bit weights but not 2-bit ones, fuse INT2 weights into
   QLinearConv / QLinearMatMul and then refuse to load the model; they never fuse blocked
   scales.
2. Each planned activation tensor ``t`` gets ``QuantizeLinear → DequantizeLinear``: the
   float inputs of the ops in :data:`ACTIVATION_OPS`, and the outputs of Conv /
   ConvTranspose / Gemm / MatMul that are not graph outputs (so that onnxruntime finds the
   output Q it needs to fuse them into QLinearConv / QLinearMatMul, whatever op follows,
   e.g. HardSwish). Outputs of those weight ops are read dequantized by every consumer;
   other tensors only by the quantized consumers. Graph outputs stay float.
3. A ``Relu`` whose input comes only from a Conv / ConvTranspose / Gemm / MatMul / Add is
   removed when activations are unsigned: the QuantizeLinear of its output, with zero point
   0, clamps negatives exactly as Relu did (this is what lets onnxruntime fuse Conv+Relu
   into one QLinearConv).
4. Conv / Gemm biases become INT32 with scale = input scale × weight scale and zero point 0,
   when the input is quantized and the weight is per-tensor or per-channel; block-wise
   weights keep a float bias.
6. Conv / ConvTranspose / Gemm nodes with an INT2 weight keep (or get, as zeros) a float
   bias: onnxruntime's QDQ selectors need every input to come from DequantizeLinear, so a
   float bias stops them from fusing an INT2 weight into QLinearConv — which they would
   otherwise do (they exclude 4-bit but not 2-bit weights, and can move DequantizeLinear past
   the Reshape of rule 1) and then fail to load the model.
5. The opset is raised to what the emitted types need (13 for per-channel INT8, 21 for
   INT4 and blocked scales or 16-bit activations, 25 for INT2) and the IR version with it.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cet_onnx.io.external_data import read_array
from cet_onnx.io.model_files import opset_version, upgrade_opset
from cet_onnx.quant.packing import make_int_tensor, stored_form
from cet_onnx.quant.quantizer import ActivationParams, QuantizedWeight, container_bits
from cet_onnx.graph.weights import WeightInfo

#: Ops whose float activation inputs get QuantizeLinear/DequantizeLinear, following
#: onnxruntime's QDQ conventions (its CPU fusions look for Q/DQ around these).
ACTIVATION_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool", "AveragePool",
    "GlobalAveragePool", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Flatten", "Reshape", "Transpose",
    "Squeeze", "Unsqueeze", "Resize",
})
WEIGHT_OUTPUT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_RELU_PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"})
_MIN_OPSET_BY_CONTAINER = {8: 13, 4: 21, 2: 25}


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    infos = list(g.input) + list(g.value_info) + list(g.output)
    return {vi.name for vi in infos if vi.type.tensor_type.elem_type == TensorProto.FLOAT}


def _consumers(nodes) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            if name:
                out.setdefault(name, []).append(i)
    return out


def removable_relus(model: onnx.ModelProto) -> list[int]:
    """Indices of Relu nodes that rule 3 removes (when activations are unsigned)."""
    g = model.graph
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    cons = _consumers(nodes)
    outputs = {o.name for o in g.output}
    result = []
    for i, n in enumerate(nodes):
        if n.op_type != "Relu" or n.domain not in ("", "ai.onnx"):
            continue
        x = n.input[0]
        p = producer.get(x)
        if p is None or nodes[p].op_type not in _RELU_PRODUCERS or x in outputs or len(cons.get(x, [])) != 1:
            continue
        result.append(i)
    return result


def activation_tensors(model: onnx.ModelProto, remove_relus: bool) -> list[str]:
    """Float activation tensors that get Q/DQ, in graph order (after optional Relu removal)."""
    g = model.graph
    skip_nodes = set(removable_relus(model)) if remove_relus else set()
    inits = {t.name for t in g.initializer}
    floats = _float_tensors(model)
    seen: dict[str, None] = {}
    outputs = {o.name for o in g.output}
    relu_out = {g.node[i].input[0]: g.node[i].output[0] for i in skip_nodes}
    for i, n in enumerate(g.node):
        if i in skip_nodes or n.op_type not in ACTIVATION_OPS or n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type in WEIGHT_OUTPUT_OPS:
            out = relu_out.get(n.output[0], n.output[0])
            if out not in outputs and out in floats:
                seen.setdefault(out)
        data_inputs = n.input[:1] if n.op_type in ("Reshape", "Resize", "Clip", "Squeeze", "Unsqueeze") else n.input
        if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
            data_inputs = n.input[:2]
        for name in data_inputs:
            if name and name not in inits and name in floats:
                seen.setdefault(name)
    return list(seen)


@dataclass
class RewriteResult:
    model: onnx.ModelProto
    opset: int
    quantized_biases: list[str]


def _replace_inputs(node: onnx.NodeProto, mapping: dict[str, str], indices=None) -> None:
    for k, name in enumerate(node.input):
        if (indices is None or k in indices) and name in mapping:
            node.input[k] = mapping[name]


def required_opset(qweights: dict[str, QuantizedWeight], act_bits: int | None) -> int:
    """Smallest opset that can express every emitted type and attribute."""
    need = 13
    for qw in qweights.values():
        need = max(need, _MIN_OPSET_BY_CONTAINER[container_bits(qw.fmt.bits)])
        if qw.block_size is not None:
            need = max(need, 21)
    if act_bits == 16:
        need = max(need, 21)
    return need


def rewrite(model: onnx.ModelProto, weights: list[WeightInfo], qweights: dict[str, QuantizedWeight],
            act_params: dict[str, ActivationParams] | None, source: str = "model",
            data_dir: str | None = None) -> RewriteResult:
    """Return a QDQ copy of ``model`` (the input proto is not modified).

    ``qweights`` maps weight names to their quantized form; ``act_params`` maps activation
    tensors (from :func:`activation_tensors`) to their parameters, or is None for weight-only
    quantization. Unsigned activation parameters turn on Relu removal (rule 3). ``data_dir``
    is where the model's external data lives, for biases kept on disk (rule 4); initializers
    that stay unchanged keep referring to their external data.
    """
    act_params = act_params or {}
    act_bits = None
    if act_params:
        act_bits = 8 * next(iter(act_params.values())).dtype.itemsize
    target = max(opset_version(model), required_opset(qweights, act_bits))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m = upgrade_opset(m, target, source)
    g = m.graph

    unsigned = bool(act_params) and all(p.dtype.kind == "u" for p in act_params.values())
    if unsigned:
        nodes = list(g.node)
        drop = set(removable_relus(m))
        producer = {o: i for i, n in enumerate(nodes) for o in n.output}
        for i in drop:
            relu = nodes[i]
            p = nodes[producer[relu.input[0]]]
            for k, o in enumerate(p.output):
                if o == relu.input[0]:
                    p.output[k] = relu.output[0]
        kept = [n for i, n in enumerate(nodes) if i not in drop]
        del g.node[:]
        g.node.extend(kept)

    inits = {t.name: t for t in g.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []

    # Rule 1: weights.
    by_name = {w.name: w for w in weights}
    for name, qw in qweights.items():
        if name not in by_name:
            raise ValueError(f"unknown weight {name}")
        q, scale, zp, axis, block, reshape = stored_form(qw)
        new_inits.append(make_int_tensor(f"{name}_quantized", q, qw.fmt.bits))
        new_inits.append(numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"))
        new_inits.append(make_int_tensor(f"{name}_zero_point", zp, qw.fmt.bits))
        attrs = {}
        if axis is not None:
            attrs["axis"] = int(axis)
        if block is not None:
            attrs["block_size"] = int(block)
        dq_out = f"{name}_dequantized_2d" if reshape else name
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                                          [dq_out], name=f"{name}_DequantizeLinear", **attrs))
        if reshape:
            new_inits.append(numpy_helper.from_array(np.array(qw.q.shape, np.int64), f"{name}_shape"))
            new_nodes.append(helper.make_node("Reshape", [dq_out, f"{name}_shape"], [name], name=f"{name}_Reshape"))
    drop_inits = set(qweights)

    # Rule 6: INT2 Conv / ConvTranspose / Gemm weights get a float bias (zeros if there was none).
    int2 = {n for n, qw in qweights.items() if container_bits(qw.fmt.bits) == 2}
    for node in g.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) >= 2 and node.input[1] in int2:
            if len(node.input) < 3 or not node.input[2]:
                qw = qweights[node.input[1]]
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                nout = {"Conv": qw.q.shape[0], "ConvTranspose": qw.q.shape[1] * group}.get(
                    node.op_type, qw.q.shape[by_name[node.input[1]].channel_axis])
                zero = f"{node.input[1]}_zero_bias"
                if zero not in {t.name for t in new_inits}:
                    new_inits.append(numpy_helper.from_array(np.zeros(nout, np.float32), zero))
                while len(node.input) < 3:
                    node.input.append("")
                node.input[2] = zero

    # Rule 4: biases (before activation renaming, using the original input names).
    quantized_biases: list[str] = []
    cons = _consumers(g.node)
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[1] in int2:
            continue
        x, w, b = node.input[0], node.input[1], node.input[2]
        if node.op_type == "Gemm" and (node.input[0] in qweights):
            continue
        qw = qweights.get(w)
        px = act_params.get(x)
        if qw is None or px is None or qw.block_size is not None or b not in inits or len(cons.get(b, [])) != 1:
            continue
        bias = np.asarray(read_array(inits[b], data_dir), dtype=np.float64)
        channel = by_name[w].channel_axis
        nch = by_name[w].shape[channel]
        if bias.ndim != 1 or bias.shape[0] != nch:
            continue
        if node.op_type == "Gemm" and any(a.name == "beta" and a.f != 1.0 for a in node.attribute):
            continue
        wscale = np.broadcast_to(qw.scale.astype(np.float64), (nch,)) if qw.axis is not None else np.full(nch, float(qw.scale))
        bscale = (px.scale * wscale).astype(np.float32)
        qb = np.rint(bias / bscale.astype(np.float64))
        if np.abs(qb).max(initial=0) >= 2**31 - 1 or not np.all(bscale > 0):
            continue
        new_inits.append(numpy_helper.from_array(qb.astype(np.int32), f"{b}_quantized"))
        new_inits.append(numpy_helper.from_array(bscale, f"{b}_scale"))
        new_inits.append(numpy_helper.from_array(np.zeros(nch, np.int32), f"{b}_zero_point"))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{b}_quantized", f"{b}_scale", f"{b}_zero_point"],
                                          [b], name=f"{b}_DequantizeLinear", axis=0))
        drop_inits.add(b)
        quantized_biases.append(b)

    # Rule 2: activations.
    mapping: dict[str, str] = {}
    for t, p in act_params.items():
        qname, dqname = f"{t}_QuantizeLinear_Output", f"{t}_DequantizeLinear_Output"
        new_inits.append(numpy_helper.from_array(np.array(p.scale, np.float32), f"{t}_scale"))
        new_inits.append(numpy_helper.from_array(np.array(p.zero_point, p.dtype), f"{t}_zero_point"))
        new_nodes.append(helper.make_node("QuantizeLinear", [t, f"{t}_scale", f"{t}_zero_point"], [qname],
                                          name=f"{t}_QuantizeLinear"))
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, f"{t}_scale", f"{t}_zero_point"], [dqname],
                                          name=f"{t}_DequantizeLinear"))
        mapping[t] = dqname
    weight_outputs = {o: mapping[o] for n in g.node if n.op_type in WEIGHT_OUTPUT_OPS for o in n.output[:1]
                      if o in mapping}
    for node in g.node:
        if node.op_type in ACTIVATION_OPS and node.domain in ("", "ai.onnx"):
            _replace_inputs(node, mapping)
        else:
            _replace_inputs(node, weight_outputs)

    kept_inits = [t for t in g.initializer if t.name not in drop_inits]
    del g.initializer[:]
    g.initializer.extend(kept_inits + new_inits)
    graph_inputs = [i for i in g.input if i.name not in drop_inits]
    del g.input[:]
    g.input.extend(graph_inputs)
    # Weight / bias DQ nodes first, then activation Q/DQ right after their producers:
    # a topological order is restored by a stable sort below.
    all_nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(_topological(all_nodes, {i.name for i in g.input} | {t.name for t in g.initializer}))
    del g.value_info[:]
    m.ir_version = max(m.ir_version, helper.find_min_ir_version_for(list(m.opset_import)))
    return RewriteResult(m, target, quantized_biases)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's order that keeps the given order wherever it is already valid."""
    available = set(available) | {""}
    producers = {o for n in nodes for o in n.output}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    waiting: dict[str, list[int]] = {}
    indeg = []
    for idx, n in enumerate(pending):
        missing = {x for x in n.input if x not in available and x in producers}
        indeg.append(len(missing))
        for x in missing:
            waiting.setdefault(x, []).append(idx)
    ready = [i for i, d in enumerate(indeg) if d == 0]
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        ordered.append(pending[i])
        for o in pending[i].output:
            for j in waiting.pop(o, []):
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(ready, j)
    if len(ordered) != len(pending):
        raise ValueError("graph has a cycle after rewriting")
    return ordered
