"""Find the quantizable weights of a graph and the axes their scales run along.

A weight is a float initializer used as the weight operand of Conv, ConvTranspose, Gemm
or MatMul. For each one we record its output-channel axis (per-channel scales) and its
reduction axis (block-wise scales run along it):

* Conv ``W[O, I/g, k...]``: channel 0, reduction 1;
* ConvTranspose ``W[I, O/g, k...]``: channel 1, reduction 0;
* Gemm ``B``: ``[K, N]`` → channel 1, reduction 0; with ``transB=1`` ``[N, K]`` → channel 0,
  reduction 1 (an initializer ``A`` is handled symmetrically);
* MatMul ``B[..., K, N]``: channel -1, reduction -2; an initializer ``A[..., M, K]``:
  channel -2, reduction -1.

A weight shared by several nodes is quantized once if every use agrees on the axes;
otherwise it stays float and is listed as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)


@dataclass
class WeightInfo:
    """One quantizable weight."""

    name: str
    shape: tuple[int, ...]
    op_type: str                  # op type of the (first) consumer
    channel_axis: int             # non-negative
    reduction_axis: int           # non-negative
    consumers: list[str] = field(default_factory=list)  # node names

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def weight_axes(node: onnx.NodeProto, index: int, rank: int) -> tuple[int, int] | None:
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
    return None


def node_label(node: onnx.NodeProto, i: int) -> str:
    """A stable name for a node (its name, or op type and position)."""
    return node.name or f"{node.op_type}_{i}"


def find_weights(model: onnx.ModelProto) -> tuple[list[WeightInfo], dict[str, str]]:
    """Quantizable weights in graph order, and skipped candidates with the reason."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    found: dict[str, WeightInfo] = {}
    skipped: dict[str, str] = {}
    other_uses: set[str] = set()
    for i, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            other_uses.update(node.input)
            continue
        for idx, name in enumerate(node.input):
            if name not in inits or name in graph_inputs:
                continue
            t = inits[name]
            axes = weight_axes(node, idx, len(t.dims)) if node.op_type in WEIGHT_OPS else None
            if node.op_type in ("Gemm", "MatMul") and idx in (0, 1):
                other = node.input[1 - idx]
                if idx == 0 and other in inits:
                    axes = None  # both operands constant: quantize B only
            if axes is None or t.data_type not in _FLOAT_TYPES:
                other_uses.add(name)
                continue
            label = node_label(node, i)
            if name in found:
                w = found[name]
                if (w.channel_axis, w.reduction_axis) != axes:
                    skipped[name] = "used with different axes by several nodes"
                w.consumers.append(label)
            else:
                found[name] = WeightInfo(name, tuple(int(d) for d in t.dims), node.op_type, axes[0], axes[1], [label])
    for name in list(found):
        if name in other_uses:
            skipped[name] = "also used as a non-weight input"
        if name in skipped:
            del found[name]
    return list(found.values()), skipped


def subgraph_weights(model: onnx.ModelProto) -> list[str]:
    """Weights of Conv / ConvTranspose / Gemm / MatMul nodes inside If / Loop / Scan bodies.

    They are left in float (the rewriter works on the main graph); the caller warns and reports.
    """
    found: list[str] = []

    def visit(graph: onnx.GraphProto, top: bool) -> None:
        consts = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
        for node in graph.node:
            if not top and node.op_type in WEIGHT_OPS:
                found.extend(f"{node.name or node.op_type}:{i}" for i in node.input if i in consts)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g, False)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g, False)

    visit(model.graph, True)
    return found
