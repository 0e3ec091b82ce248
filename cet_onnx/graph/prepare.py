"""The graph as the stages need it: local functions holding layers inlined, Constant weights lifted (those inside If / Loop / Scan bodies
too), simplified by onnxsim, tied copies of a table tied again, shapes inferred.

onnxsim and onnx's shape inference work on protobufs: the model is serialized for them and read
back. A model whose weights stay on disk is not simplified (onnxsim would load them all); shape
inference runs without the weights' data (onnx-ir's ShapeInferencePass strips and restores it).
A failure of either only warns: the stages can work on the model as loaded.
"""

from __future__ import annotations

import os

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass, RemoveUnusedOpsetsPass, ShapeInferencePass

from cet_onnx.errors import first_line
from cet_onnx.graph.passes.constants_to_initializers import ConstantsToInitializersPass
from cet_onnx.graph.passes.fold_constant_if import FoldConstantIfPass
from cet_onnx.graph.passes.fix_inputs import FixInputsPass
from cet_onnx.graph.passes.lift_subgraph_weights import LIFTED_INPUTS, LiftSubgraphWeightsPass
from cet_onnx.graph.passes.tie_transposed import TieTransposedCopiesPass
from cet_onnx.io import external_data
from cet_onnx.io.load import load_model
from cet_onnx.io.sizes import fits_protobuf
from cet_onnx.progress import warn


def simplify(model: ir.Model, source: str) -> ir.Model:
    """Run onnxsim; on any failure warn and return the model unchanged."""
    try:
        import onnxsim
    except ImportError:
        warn("onnxsim is not installed; continuing without simplification")
        return model
    if external_data.external_tensors(model):
        warn(f"{source}: weights stay on disk (large model), skipping onnxsim simplification")
        return model
    if not fits_protobuf(model):
        warn(f"{source}: larger than 2 GB, skipping onnxsim simplification")
        return model
    try:
        simplified, ok = onnxsim.simplify(ir.serde.serialize_model(model))
    except Exception as exc:
        warn(f"{source}: onnxsim failed ({first_line(exc)}); continuing with the unsimplified model")
        return model
    if not ok:
        warn(f"{source}: onnxsim could not validate its result; continuing with the unsimplified model")
        return model
    return ir.serde.deserialize_model(simplified)


def infer_shapes(model: ir.Model, source: str) -> ir.Model:
    """onnx shape inference (lenient: no type check, no strict mode, no data propagation)."""
    try:
        return ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model).model
    except Exception as exc:
        warn(f"{source}: shape inference failed ({first_line(exc)}); continuing")
        return model


def inline_weight_functions(model: ir.Model) -> list[str]:
    """Inline the model-local functions that hold a Conv / ConvTranspose / Gemm / MatMul / Gather or recurrent
    layer (onnx-ir's InlinePass), so that their weights are found like any other; the names of those inlined."""
    holds = [f"{f.domain}::{f.name}" for f in model.functions.values()
             if any(n.op_type in LIFTED_INPUTS for n in f)]
    if holds:
        InlinePass(criteria=lambda f: any(n.op_type in LIFTED_INPUTS for n in f))(model)
        RemoveUnusedOpsetsPass()(model)
    return holds


def lift_weights(model: ir.Model) -> None:
    """Weights held in main-graph ``Constant`` nodes, and those of layers inside If / Loop / Scan bodies,
    become main-graph initializers (where :func:`~cet_onnx.graph.weights.find_weights` looks)."""
    ConstantsToInitializersPass()(model)
    LiftSubgraphWeightsPass()(model)


def prepare_model(path: str | os.PathLike, do_simplify: bool = True,
                  fix: FixInputsPass | None = None) -> ir.Model:
    """Load → inline local functions that hold layers → fix inputs (``fix``, :mod:`.passes.fix_inputs`) and fold the Ifs they decide → Constant weights to initializers → simplify →
    subgraph weights to main-graph initializers → tie transposed copies → shape inference."""
    model = load_model(path)
    inline_weight_functions(model)
    if fix is not None:
        fix(model)
        FoldConstantIfPass()(model)
    lift_weights(model)    # before onnxsim, which renames what it finds in subgraphs
    if do_simplify:
        model = simplify(model, str(path))
        ConstantsToInitializersPass()(model)
        LiftSubgraphWeightsPass()(model)
    TieTransposedCopiesPass()(model)
    return infer_shapes(model, str(path))
