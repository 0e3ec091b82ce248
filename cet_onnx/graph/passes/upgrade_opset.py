"""Pass: raise the default-domain opset (and the IR version with it) to what the emitted types need.

Rules:

* when the model imports an opset below ``target``, onnx's version converter rewrites it to
  ``target`` (it works on protos: the model is serialized, converted and read back); when it
  fails, the error names the first op type that blocks the conversion;
* the IR version becomes at least the smallest one that supports the model's opsets.

Which opset the quantized types need (13 for per-channel INT8, 21 for INT4 and blocked scales
or 16-bit activations, 25 for INT2) is :func:`cet_onnx.graph.rewriter.required_opset`.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import helper

from cet_onnx.graph import boundary
from cet_onnx.errors import RuntimeFailure


def opset_version(model: onnx.ModelProto | ir.Model) -> int:
    """The default-domain opset the model imports."""
    if isinstance(model, ir.Model):
        for domain in ("", "ai.onnx"):
            if domain in model.opset_imports:
                return int(model.opset_imports[domain])
        return 1
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def _blocking_op(model: onnx.ModelProto, target: int) -> str | None:
    """The first op type whose node alone fails to convert (slow; only used after a failure)."""
    from onnx import version_converter
    seen = set()
    for node in model.graph.node:
        if node.op_type in seen or node.domain not in ("", "ai.onnx"):
            continue
        seen.add(node.op_type)
        ins = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in dict.fromkeys(node.input) if n]
        outs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in node.output if n]
        single = helper.make_model(helper.make_graph([node], "probe", ins, outs),
                                   opset_imports=[helper.make_opsetid("", opset_version(model))])
        try:
            version_converter.convert_version(single, target)
        except Exception:
            return node.op_type
    return None


def upgrade_opset(model: onnx.ModelProto, target: int, source: str) -> onnx.ModelProto:
    """Convert the model proto to at least opset ``target``; name the op that blocks it on failure."""
    current = opset_version(model)
    if current >= target:
        return model
    from onnx import version_converter
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        detail = text[0] if text else type(exc).__name__
        ops = [n.op_type for n in model.graph.node]
        blocking = next((op for op in dict.fromkeys(ops) if op in detail), None) or _blocking_op(model, target)
        what = f"op '{blocking}' blocked it" if blocking else detail
        raise RuntimeFailure(f"{source}: cannot convert opset {current} to {target} "
                             f"(needed by the quantized types): {what}") from None
    return converted


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Brings the model to opset ``target`` or above, with a matching IR version.

    A converted model replaces the contents of the one given (graph, functions and fields).
    """

    def __init__(self, target: int, source: str = "model") -> None:
        super().__init__()
        self.target = target
        self.source = source

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = opset_version(model) < self.target
        if modified:
            proto = upgrade_opset(ir.serde.serialize_model(model), self.target, self.source)
            _replace_contents(model, boundary.read_back(proto, model))
        opsets = [helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
        ir_version = max(model.ir_version, helper.find_min_ir_version_for(opsets))
        modified = modified or ir_version != model.ir_version
        model.ir_version = ir_version
        return ir.passes.PassResult(model, modified=modified)


def _replace_contents(model: ir.Model, new: ir.Model) -> None:
    model.graph = new.graph
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(new, field))
    model.functions.clear()
    model.functions.update(new.functions)
    model.metadata_props.clear()
    model.metadata_props.update(new.metadata_props)
