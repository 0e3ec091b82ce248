"""Rewrite a float graph into onnxruntime's QDQ format: the passes of :mod:`cet_onnx.graph.passes`, in order.

1. :class:`~.passes.upgrade_opset.UpgradeOpsetPass` — the opset the emitted types need
   (:func:`required_opset`), and the IR version with it;
   then :class:`~.passes.matmul_nbits_form.MatMulNBitsFormPass` — low-bit MatMul / Gemm weights in the
   form onnxruntime fuses into ``MatMulNBits`` (those nodes keep float activations and bias), and with
   ``contrib_level`` :class:`~.passes.matmul_nbits_contrib.MatMulNBitsContribPass` writes them as
   ``com.microsoft.MatMulNBits`` directly (``--emit-contrib``);
   then, unless activations stay float (weight-only), :class:`~.passes.dynamic_lstm.DynamicLSTMPass` — INT8
   LSTMs as onnxruntime's ``DynamicQuantizeLSTM``;
2. :class:`~.passes.fold_relu.FoldReluPass` — only when every activation is unsigned, and not
   under the transformer rule (:func:`transformer_rules`); only Relus whose output is planned;
3. :class:`~.passes.weight_qdq.WeightQDQPass` — packed INT8 / INT4 / INT2 weights and
   DequantizeLinear (per-channel INT4 / INT2 weights of Conv / MatMul / Gemm widened to INT8 by a
   Cast onnxruntime folds at load, unless activations stay float: :func:`~.passes.weight_qdq.int8_kernel_weights`), then :class:`~.passes.gather_rows.GatherRowsPass` — embedding tables are
   looked up before they are dequantized;
4. :class:`~.passes.int2_float_bias.Int2FloatBiasPass` — INT2-weight layers keep a float bias;
5. :class:`~.passes.int32_bias.Int32BiasPass` — INT32 biases (before the activation pass, which
   renames the inputs it reads);
6. :class:`~.passes.activation_qdq.ActivationQDQPass` — QuantizeLinear → DequantizeLinear on
   the planned activations (for a graph with attention or LayerNorm, only the inputs of
   weight MatMuls / Gemms and of convolution parts: :func:`transformer_rules`);
7. :class:`~.passes.dynamic_matmul.DynamicMatMulPass` — only in dynamic activation mode:
   INT8-weight MatMuls quantize their input at run time;
8. :class:`~.passes.stable_sort.StableTopologicalSortPass` and
   :class:`~.passes.drop_value_info.DropValueInfoPass`.

Each function takes an ``onnx.ModelProto`` or an ``onnx_ir.Model`` and answers in the same kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic

import onnx
import onnx_ir as ir

from cet_onnx.graph import boundary
from cet_onnx.graph.boundary import Model
from cet_onnx.graph.passes import activation_qdq
from cet_onnx.graph.act_mode import transformer_evidence
from cet_onnx.graph.passes._graph import values_by_name
from cet_onnx.graph.passes.activation_qdq import TRANSFORMER_ACTIVATION_OPS, ActivationQDQPass
from cet_onnx.graph.passes.drop_value_info import DropValueInfoPass
from cet_onnx.graph.passes.dynamic_lstm import DynamicLSTMPass
from cet_onnx.graph.passes.dynamic_matmul import DynamicMatMulPass
from cet_onnx.graph.passes.fold_relu import FoldReluPass, foldable_relus
from cet_onnx.graph.passes.gather_rows import GatherRowsPass
from cet_onnx.graph.passes.int2_float_bias import Int2FloatBiasPass
from cet_onnx.graph.passes.half_bias_add import HalfBiasAddPass
from cet_onnx.graph.passes.int32_bias import Int32BiasPass
from cet_onnx.graph.passes.matmul_nbits_contrib import MatMulNBitsContribPass
from cet_onnx.graph.passes.matmul_nbits_form import MatMulNBitsFormPass
from cet_onnx.graph.passes.stable_sort import StableTopologicalSortPass
from cet_onnx.graph.passes.upgrade_opset import UpgradeOpsetPass, opset_version
from cet_onnx.graph.passes.weight_qdq import WeightQDQPass, int8_kernel_weights
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.quant.quantizer import ActivationParams, QuantizedWeight
from cet_onnx.quant.sizes import container_bits

#: Ops whose float activation inputs get Q/DQ. Read at each call, so a caller may patch it.
ACTIVATION_OPS = activation_qdq.ACTIVATION_OPS
_MIN_OPSET_BY_CONTAINER = {8: 13, 4: 21, 2: 25}


def removable_relus(model: onnx.ModelProto | ir.Model) -> list[int]:
    """Positions (in the node list) of the Relu nodes :class:`FoldReluPass` removes."""
    graph = boundary.to_ir(model).graph
    relus = set(foldable_relus(graph))
    return [i for i, node in enumerate(graph) if node in relus]


def transformer_rules(graph: ir.Graph) -> bool:
    """Whether static activations follow the transformer rule
    (:data:`.activation_qdq.TRANSFORMER_ACTIVATION_OPS`): graphs with attention or LayerNorm."""
    return transformer_evidence(graph) is not None


def activation_tensors(model: onnx.ModelProto | ir.Model, remove_relus: bool) -> list[str]:
    """Float activation tensors that get Q/DQ, in graph order (:func:`.activation_qdq.activation_tensors`,
    or :func:`.activation_qdq.transformer_activation_tensors` under :func:`transformer_rules`)."""
    graph = boundary.to_ir(model).graph
    if transformer_rules(graph):
        return activation_qdq.transformer_activation_tensors(graph)
    return activation_qdq.activation_tensors(graph, remove_relus, ACTIVATION_OPS)


@dataclass
class RewriteResult(Generic[Model]):
    model: Model
    opset: int
    quantized_biases: list[str]
    dynamic_matmuls: list[str] = field(default_factory=list)


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


def _half_precision_opset(model: Model, qweights: dict[str, QuantizedWeight],
                          act_params: dict[str, ActivationParams]) -> int:
    """19 when a quantized weight or activation is float16 / bfloat16 (half-precision inputs and
    scales of QuantizeLinear / DequantizeLinear need opset 19), else 13."""
    graph = boundary.to_ir(model).graph
    half = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    values = values_by_name(graph)
    return 19 if any(name in values and values[name].dtype in half for name in (*qweights, *act_params)) else 13


def rewrite(model: Model, weights: list[WeightInfo], qweights: dict[str, QuantizedWeight],
            act_params: dict[str, ActivationParams] | None, source: str = "model",
            dynamic: bool = False, contrib_level: int | None = None, widen: bool = True) -> RewriteResult[Model]:
    """Return a QDQ copy of ``model`` (the input is not modified).

    ``qweights`` maps weight names to their quantized form; ``act_params`` maps activation
    tensors (from :func:`activation_tensors`) to their parameters, or is None for weight-only
    quantization (then also no ``DynamicQuantizeLSTM``, which quantizes its input at run time). ``dynamic``: INT8-weight MatMuls quantize their input at run time. ``contrib_level``: write
    MatMul weights in the ``MatMulNBits`` form as ``com.microsoft.MatMulNBits`` with this ``accuracy_level``
    (None: plain ONNX, fused by onnxruntime at load time). ``widen``: per-channel INT4 / INT2 weights of a
    model with quantized activations are widened to INT8 for onnxruntime's INT8 kernels (needs onnxruntime
    ≥ 1.23 for the Cast from INT4); without it they take the ``MatMulNBits`` form (MatMul / Gemm) or are
    dequantized on every run (Conv), loadable by onnxruntime ≥ 1.19. Unsigned activation parameters turn on Relu folding. Initializers that stay
    unchanged keep referring to their external data. The result has no value_info.
    """
    weight_only = act_params is None and not dynamic
    act_params = act_params or {}
    known = {w.name for w in weights}
    unknown = next((name for name in qweights if name not in known), None)
    if unknown is not None:
        raise ValueError(f"unknown weight {unknown}")
    act_bits = 8 * max(p.dtype.itemsize for p in act_params.values()) if act_params else None   # 8 and 16 may mix
    target = max(opset_version(model), required_opset(qweights, act_bits),
                 _half_precision_opset(model, qweights, act_params))
    m = boundary.working_copy(model)
    transformer = transformer_rules(m.graph)
    qweights = dict(qweights)   # the MatMulNBits form stores some weights transposed
    nbits = MatMulNBitsFormPass(qweights, all_bits=weight_only, low_bit_channels=not widen)   # not for a static plan that left every activation float
    for p in (UpgradeOpsetPass(target, source), nbits):
        p(m)
    if contrib_level is not None:
        contrib = MatMulNBitsContribPass(qweights, nbits.weights - nbits.guarded, contrib_level)
        contrib(m)
        qweights = {k: v for k, v in qweights.items() if k not in contrib.converted}
    if not weight_only:
        DynamicLSTMPass(qweights)(m)
    passes: list[ir.passes.PassBase] = []
    if act_params and all(p.dtype.kind == "u" for p in act_params.values()) and not transformer:
        passes.append(FoldReluPass(nbits.float_nodes, planned=act_params, activation_ops=ACTIVATION_OPS))
    int8_codes = set() if weight_only or not widen else int8_kernel_weights(m.graph, qweights, nbits.weights)
    biases = Int32BiasPass(qweights, weights, act_params, nbits.float_nodes, int8_codes)
    dynamic_pass = DynamicMatMulPass()
    passes += [WeightQDQPass(qweights, nbits.weights, int8_codes), GatherRowsPass(),
               Int2FloatBiasPass(qweights, weights, int8_codes), biases,
               HalfBiasAddPass(qweights, act_params),
               ActivationQDQPass(act_params, TRANSFORMER_ACTIVATION_OPS if transformer else ACTIVATION_OPS,
                                 nbits.float_nodes),
               *([dynamic_pass] if dynamic else []),
               StableTopologicalSortPass(), DropValueInfoPass()]
    for p in passes:
        p(m)
    if isinstance(model, onnx.ModelProto):
        out = boundary.to_proto(m, model)
        del out.graph.value_info[:]
        return RewriteResult(out, target, biases.quantized_biases, dynamic_pass.converted)
    return RewriteResult(m, target, biases.quantized_biases, dynamic_pass.converted)

