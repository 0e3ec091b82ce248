"""Which kernels onnxruntime runs for a model: its optimised graph, inspected rather than assumed.

onnxruntime fuses a quantized model's Q/DQ nodes into integer kernels at load time only for exact
graph shapes (``QLinearConv`` / ``QLinearMatMul`` for INT8 QDQ groups, ``MatMulNBits`` for a
blocked or per-channel low-bit MatMul weight with no activation Q/DQ around it,
``GatherBlockQuantized`` for a quantized embedding table). A weight whose ``DequantizeLinear`` is
still in the optimised graph is dequantized on every run, which is what makes a small model
slow. :func:`inspect_kernels` saves onnxruntime's optimised graph
(``SessionOptions.optimized_model_filepath``, level *extended*, the level those fusions need and
below the hardware-specific layout changes of *all*) and lists both.
"""

from __future__ import annotations

import collections
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx
import onnx_ir as ir
import onnxruntime as ort

from cet_onnx.errors import RuntimeFailure, first_line
from cet_onnx.io.save import temporary_copy

#: ops whose float weight input (at these positions) is read from a ``DequantizeLinear`` when onnxruntime did not fuse it
WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "FusedConv": (1,), "MatMul": (0, 1), "FusedMatMul": (0, 1),
                 "Gemm": (0, 1), "FusedGemm": (0, 1), "Gather": (0,), "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}
#: onnxruntime's integer / low-bit kernels that fused Q/DQ groups become
FAST_KERNELS = ("MatMulNBits", "QLinearConv", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul",
                "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "GatherBlockQuantized", "DynamicQuantizeLSTM")
#: ops that only reshape a dequantized weight on its way to its consumer (INT2 Conv kernels)
_PASS_THROUGH = ("Reshape", "Transpose")


@dataclass
class Kernels:
    """Op counts of onnxruntime's optimised graph, and the weights it still dequantizes on every run."""

    ops: dict[str, int]
    dequantized_at_run_time: list[dict[str, str]]   # {"weight", "consumer_op"}

    def as_dict(self) -> dict[str, Any]:
        return {"level": "extended", "ops": self.ops, "dequantized_at_run_time": self.dequantized_at_run_time}


def inspect_kernels(model: ir.Model | onnx.ModelProto | str | Path, providers: Sequence[str]) -> Kernels:
    """Load ``model`` in onnxruntime at optimisation level *extended* and read back the graph it runs."""
    with tempfile.TemporaryDirectory(prefix="cet_onnx_kernels_") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(optimized)
        opts.log_severity_level = 3
        # tensors go to a side file: the graph alone is read back, and a large model stays under protobuf's 2 GB
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            if isinstance(model, (str, Path)):
                ort.InferenceSession(str(model), opts, providers=list(providers))
            else:
                with temporary_copy(model if isinstance(model, ir.Model) else ir.from_proto(model)) as path:
                    ort.InferenceSession(str(path), opts, providers=list(providers))
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        graph = onnx.load(str(optimized), load_external_data=False).graph
    nodes = _nodes(graph)
    return Kernels(dict(collections.Counter(n.op_type for n in nodes).most_common()), _unfused(graph, nodes))


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and its If / Loop / Scan bodies, at any depth."""
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                found.extend(_graphs(sub))
    return found


def _nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [node for g in _graphs(graph) for node in g.node]


def _unfused(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[dict[str, str]]:
    """Every ``DequantizeLinear`` of an initializer whose result (through Reshape / Transpose) feeds a weight op
    (in any graph: ``nodes`` holds those of the subgraphs too)."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = collections.defaultdict(list)
    for node in nodes:
        for k, name in enumerate(node.input):
            consumers[name].append((node, k))
    initializers = {t.name for g in _graphs(graph) for t in g.initializer}
    found = []
    for node in nodes:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
            continue
        frontier, seen = [node.output[0]], set()
        while frontier:
            value = frontier.pop()
            for user, k in consumers.get(value, []):
                if user.op_type in _PASS_THROUGH and user.output[0] not in seen:
                    seen.add(user.output[0])
                    frontier.append(user.output[0])
                elif k in WEIGHT_INPUTS.get(user.op_type, ()):
                    found.append({"weight": value, "consumer_op": user.op_type})
    return found
