"""Find the quantizable weights of a graph and the axes their scales run along.

A weight is a float initializer used as the weight operand of Conv, ConvTranspose, Gemm
or MatMul, as the table of a ``Gather`` (an embedding), or as ``W`` / ``R`` of LSTM / GRU / RNN. For each one we record its output-channel axis (per-channel scales) and its
reduction axis (block-wise scales run along it):

* Conv ``W[O, I/g, k...]``: channel 0, reduction 1;
* ConvTranspose ``W[I, O/g, k...]``: channel 1, reduction 0;
* Gemm ``B``: ``[K, N]`` → channel 1, reduction 0; with ``transB=1`` ``[N, K]`` → channel 0,
  reduction 1 (an initializer ``A`` is handled symmetrically);
* MatMul ``B[..., K, N]``: channel -1, reduction -2; an initializer ``A[..., M, K]``:
  channel -2, reduction -1;
* Gather (``axis`` 0) over a table ``[rows, width]``: channel 0 (a scale per row), reduction 1
  (blocks along the row);
* LSTM / GRU / RNN ``W [directions, gates·hidden, input]`` and ``R [directions, gates·hidden, hidden]``:
  channel 1 (a scale per gate row), reduction 2; they run as DequantizeLinear → the float recurrent op;
* a 2-D ``Transpose`` of the initializer read only as the weight of MatMul / Gemm (a tied LM
  head ``MatMul(x, Transpose(E))``): the consumers' axes, mapped back through the transpose
  (for the tied table ``E [vocab, width]``: channel 0, reduction 1, as its Gather use).

A weight shared by several nodes is quantized once if every use agrees on the axes;
otherwise it stays float and is listed as skipped. Nodes inside If / Loop / Scan bodies count as
uses of the main-graph initializers they read (:mod:`.passes.lift_subgraph_weights` puts the
weights of subgraph layers there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from cet_onnx.graph import boundary
from cet_onnx.graph.passes._graph import all_nodes, is_onnx

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", *RECURRENT_OPS)
#: the inputs of each weight op that may be a weight
WEIGHT_POSITIONS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "Gather": (0,),
                    **{op: (1, 2) for op in RECURRENT_OPS}}
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)


@dataclass
class WeightInfo:
    """One quantizable weight."""

    name: str
    shape: tuple[int, ...]
    op_type: str                  # op type of the first consumer; Gather if any (its formats are the stricter)
    channel_axis: int             # non-negative
    reduction_axis: int           # non-negative
    consumers: list[str] = field(default_factory=list)  # node names
    integer_kernel: bool = False  # read by a u8 × s8 integer kernel (cet_onnx.graph.integer_kernels)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _attr(node: onnx.NodeProto | ir.Node, name: str, default: int = 0) -> int:
    if isinstance(node, ir.Node):
        return int(node.attributes.get_int(name, default))
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def weight_axes(node: onnx.NodeProto | ir.Node, index: int, rank: int) -> tuple[int, int] | None:
    """(channel_axis, reduction_axis) for input ``index`` of ``node`` as a weight, or None."""
    op = node.op_type
    if op == "Conv" and index == 1 and rank >= 3:
        return 0, 1
    if op == "ConvTranspose" and index == 1 and rank >= 3:
        return 1, 0
    if op == "Gemm" and rank == 2:
        if index == 1:
            return (0, 1) if _attr(node, "transB") else (1, 0)
        if index == 0:
            return (1, 0) if _attr(node, "transA") else (0, 1)
    if op == "MatMul" and rank >= 2:
        if index == 1:
            return rank - 1, rank - 2
        if index == 0:
            return rank - 2, rank - 1
    if op == "Gather" and index == 0 and rank == 2 and _attr(node, "axis") == 0:
        return 0, 1
    if op in RECURRENT_OPS and index in (1, 2) and rank == 3:
        return 1, 2
    return None


def node_label(node: onnx.NodeProto | ir.Node, i: int) -> str:
    """A stable name for a node (its name, or op type and position)."""
    return node.name or f"{node.op_type}_{i}"


def _add_use(found: dict[str, WeightInfo], skipped: dict[str, str], name: str, t: ir.TensorProtocol,
             op_type: str, axes: tuple[int, int], label: str) -> None:
    if name in found:
        w = found[name]
        if (w.channel_axis, w.reduction_axis) != axes:
            skipped[name] = "used with different axes by several nodes"
        w.consumers.append(label)
        if op_type == "Gather":
            w.op_type = "Gather"
    else:
        found[name] = WeightInfo(name, tuple(int(d) for d in t.shape), op_type, axes[0], axes[1], [label])


def _transposed_weight_uses(graph: ir.Graph) -> dict[ir.Node, tuple[str, str, tuple[int, int], list[str]]]:
    """2-D Transposes of an initializer read only as a MatMul / Gemm weight →
    (initializer, consumer op type, the initializer's axes, consumer labels)."""
    index = {node: i for i, node in enumerate(all_nodes(graph))}
    out = {}
    for node in index:
        src = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if src is None or not src.is_initializer() or src.const_value is None or len(src.const_value.shape) != 2:
            continue
        perm = list(node.attributes.get_ints("perm", [1, 0]))
        uses = list(node.outputs[0].uses())
        if perm != [1, 0] or not uses or node.outputs[0].is_graph_output():
            continue
        axes = {weight_axes(u.node, u.idx, 2) if u.node.op_type in ("MatMul", "Gemm") and u.idx == 1
                and is_onnx(u.node) else None for u in uses}
        if len(axes) == 1 and None not in axes:
            c, r = axes.pop()
            out[node] = (src.name, uses[0].node.op_type, (perm[c], perm[r]),
                         [node_label(u.node, index[u.node]) for u in uses])
    return out


def find_weights(model: onnx.ModelProto | ir.Model) -> tuple[list[WeightInfo], dict[str, str]]:
    """Quantizable weights in graph order, and skipped candidates with the reason."""
    graph = boundary.to_ir(model).graph
    inits = graph.initializers
    graph_inputs = {v.name for v in graph.inputs}
    found: dict[str, WeightInfo] = {}
    skipped: dict[str, str] = {}
    other_uses: set[str] = set()
    through = _transposed_weight_uses(graph)
    for i, node in enumerate(all_nodes(graph)):
        names = [v.name if v is not None else "" for v in node.inputs]
        if node.domain not in ("", "ai.onnx"):
            other_uses.update(names)
            continue
        if node in through:
            name, op_type, axes, labels = through[node]
            t = inits[name].const_value
            if int(t.dtype) in _FLOAT_TYPES and name not in graph_inputs:
                for label in labels:
                    _add_use(found, skipped, name, t, op_type, axes, label)
                continue
        for idx, name in enumerate(names):
            if name not in inits or name in graph_inputs:
                continue
            t = inits[name].const_value
            axes = weight_axes(node, idx, len(t.shape)) if node.op_type in WEIGHT_OPS else None
            if node.op_type in ("Gemm", "MatMul") and idx in (0, 1):
                other = names[1 - idx] if len(names) > 1 - idx else ""
                if idx == 0 and other in inits:
                    axes = None  # both operands constant: quantize B only
            if axes is None or int(t.dtype) not in _FLOAT_TYPES:
                other_uses.add(name)
                continue
            _add_use(found, skipped, name, t, node.op_type, axes, node_label(node, i))
    for name in list(found):
        if name in other_uses:
            skipped[name] = "also used as a non-weight input"
        if name in skipped:
            del found[name]
    return list(found.values()), skipped


def subgraph_weights(model: onnx.ModelProto | ir.Model) -> list[str]:
    """Constant weights of Conv / ConvTranspose / Gemm / MatMul nodes inside If / Loop / Scan bodies that
    are still held there (:mod:`.passes.lift_subgraph_weights` moves those it can to the main graph).

    They are left in float; the caller warns and reports.
    """
    found: list[str] = []

    def visit(graph: ir.Graph, top: bool) -> None:
        consts = {name for name, v in graph.initializers.items() if _is_float(v)}
        consts |= {n.outputs[0].name for n in graph if n.op_type == "Constant" and _is_float(n.outputs[0])}
        for node in graph:
            if not top and node.op_type in WEIGHT_OPS:
                positions = WEIGHT_POSITIONS[node.op_type]
                found.extend(f"{node.name or node.op_type}:{v.name}" for i, v in enumerate(node.inputs)
                             if i in positions and v is not None and v.name in consts)
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    visit(attr.as_graph(), False)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.as_graphs():
                        visit(g, False)

    visit(boundary.to_ir(model).graph, True)
    return found


def _is_float(value: ir.Value) -> bool:
    """A value whose element type is float (or unknown: a Constant's output may not be typed yet)."""
    return value.dtype is None or int(value.dtype) in _FLOAT_TYPES
