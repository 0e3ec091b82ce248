"""The ``onnx.ModelProto`` ↔ ``ir.Model`` boundary of the graph passes.

The passes work on :class:`onnx_ir.Model`, and so does the pipeline; each public graph function
also takes an ``onnx.ModelProto`` (tests, tools) and returns the kind it was given. A proto is
converted with ``ir.serde`` on the way in and out, and :func:`to_proto` keeps the proto's
``value_info`` as it was: onnx-ir stores shapes on the values themselves and would write them
back in its own order, with an entry for every initializer. Entries are kept (unchanged, in
the original order) for the names whose values still carry a type or shape in the result, and
for graph inputs and outputs; entries that onnx-ir adds for new non-initializer values follow.
Metadata keeps its original order (onnx-ir sorts it by key), and fields set to "" and
unchanged opset entries are written as they were. An unchanged model comes back byte-identical.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import onnx
import onnx_ir as ir

from cet_onnx.io import external_data

Model = TypeVar("Model", onnx.ModelProto, ir.Model)


def to_ir(model: onnx.ModelProto | ir.Model) -> ir.Model:
    """``model`` as an ``ir.Model`` (a proto is converted; its tensors are shared, not copied)."""
    return model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)


def to_proto(model: ir.Model, original: onnx.ModelProto) -> onnx.ModelProto:
    """Serialize ``model``, with ``original``'s value_info handled as the module docstring says."""
    proto = ir.serde.serialize_model(model)
    written = {vi.name: vi for vi in proto.graph.value_info}
    io_names = {v.name for v in (*proto.graph.input, *proto.graph.output)}
    initializers = {t.name for t in proto.graph.initializer}
    old = {vi.name for vi in original.graph.value_info}
    kept = [vi for vi in original.graph.value_info if vi.name in written or vi.name in io_names]
    added = [vi for name, vi in written.items() if name not in old and name not in initializers]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept + added)
    _keep_entry_order(proto.metadata_props, original.metadata_props)
    _keep_entry_order(proto.graph.metadata_props, original.graph.metadata_props)
    _keep_empty_fields(proto, original, ("producer_name", "producer_version", "domain", "doc_string"))
    _keep_empty_fields(proto.graph, original.graph, ("name", "doc_string"))
    old_opsets = {(e.domain, e.version): e for e in original.opset_import}
    for entry in proto.opset_import:
        same = old_opsets.get((entry.domain, entry.version))
        if same is not None:
            entry.CopyFrom(same)
    return proto


def _keep_empty_fields(message, original, fields: tuple[str, ...]) -> None:
    """Keep a field that the original set to "" (onnx-ir leaves empty strings unset)."""
    for name in fields:
        if original.HasField(name) and getattr(original, name) == getattr(message, name):
            setattr(message, name, getattr(original, name))


def _keep_entry_order(entries, original_entries) -> None:
    """onnx-ir writes metadata sorted by key; keep the original order when nothing changed."""
    if {e.key: e.value for e in entries} == {e.key: e.value for e in original_entries}:
        del entries[:]
        entries.extend(original_entries)


def like(result: ir.Model, original: Model) -> Model:
    """``result`` as the kind of model ``original`` is."""
    return result if isinstance(original, ir.Model) else to_proto(result, original)


def apply_in_place(model: onnx.ModelProto | ir.Model, run: Callable[[ir.Model], bool]) -> bool:
    """Run ``run`` (an in-place edit returning whether it changed anything) on ``model``.

    A proto is edited in place too: when ``run`` changed the graph, its contents are replaced.
    """
    if isinstance(model, ir.Model):
        return run(model)
    m = to_ir(model)
    changed = run(m)
    if changed:
        model.CopyFrom(to_proto(m, model))
    return changed


def read_back(proto: onnx.ModelProto, like: ir.Model) -> ir.Model:
    """``proto`` (made from ``like``) as an ``ir.Model`` whose on-disk weights resolve in ``like``'s folder."""
    out = ir.serde.deserialize_model(proto)
    folder = external_data.data_dir(like)
    if folder is not None:
        ir.external_data.set_base_dir(out.graph, folder)
    return out


def working_copy(model: onnx.ModelProto | ir.Model) -> ir.Model:
    """An ``ir.Model`` the caller may edit without touching ``model``: a proto converted, an ``ir.Model`` copied."""
    return to_ir(model) if isinstance(model, onnx.ModelProto) else copy(model)


def copy(model: ir.Model) -> ir.Model:
    """An independent copy of an ``ir.Model`` (through its proto); weights left on disk stay there."""
    return read_back(ir.serde.serialize_model(model), model)
