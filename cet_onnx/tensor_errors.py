"""Per-tensor error of a quantized model against its float model: where the accuracy goes.

When the output drifts, the question is which tensor did it. For every weight and every
activation tensor around a weight's layer this gives the SQNR of the quantized model's tensor
against the float model's, the way onnxruntime's ``qdq_loss_debug`` and AIMET's QuantAnalyzer do:

* **weights**: the dequantized weight against the float weight (exact, from the codes);
* **activations**: every activation input of a weight's layer, every output of such a layer and
  every other tensor the emitted graph quantizes (static Q/DQ, or the dynamic MatMul's run-time
  quantizer), found under the same name in both graphs, run on the same batches: both sessions
  side by side, error sums accumulated run by run (where the model's sample axis is free, a batch
  runs in pieces of as many samples as keep one run's exposed tensors of both models within
  :data:`cet_onnx.exposed.RUN_MAX_BYTES`; a dynamic quantizer then takes its range over a piece); above :data:`SIDE_BY_SIDE_MAX_BYTES` of
  weights the float model's tensors are computed first and held, so that onnxruntime never holds
  both models. Two SQNRs:

  - ``sqnr_db``: the quantized model's tensor (for a quantized one: its dequantized value, what
    its consumers read) against the float model's — the error accumulated up to that tensor;
  - ``quantizer_sqnr_db`` (quantized activations only): the tensor's own quantizer, its
    dequantized value against its input in the quantized model — the error that point adds
    (where the rewrite folded a Relu into the quantizer's range, the input is taken after the Relu).

Both graphs run as written (onnxruntime's graph optimisations off): its QDQ fusions would compute
an exposed intermediate tensor along another path than the graph says. Positions where either
value is non-finite (``-inf`` attention masks) are not counted.
``precision`` says what the emitted graph does with the tensor: ``int8 static`` /
``int16 static`` (a QuantizeLinear → DequantizeLinear pair), ``int8 dynamic``
(``DynamicQuantizeLinear``), or ``float``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.graph.passes._graph import branch_nodes
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.exposed import ExposedSession, pieces, samples_per_run
from cet_onnx.runner import Feed

_CHUNK = 1 << 20   # elements per step of an SQNR sum
#: float weight bytes up to which both sessions run side by side; above, the float model's tensors are
#: computed first and held, and its session dropped before the quantized one is built
SIDE_BY_SIDE_MAX_BYTES = 2**30
_STATIC_BITS = {ir.DataType.UINT8: 8, ir.DataType.INT8: 8, ir.DataType.UINT16: 16, ir.DataType.INT16: 16}


class SqnrSums:
    """Running ‖ref‖² and ‖ref − test‖² over the positions finite in both."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        ref, test = np.asarray(ref), np.asarray(test)
        if ref.shape != test.shape:
            raise ValueError(f"shapes differ: {ref.shape} vs {test.shape}")
        ref, test = ref.reshape(-1), test.reshape(-1)
        for start in range(0, ref.size, _CHUNK):   # temporaries stay small on a large weight
            r = ref[start:start + _CHUNK].astype(np.float32, copy=False)
            t = test[start:start + _CHUNK].astype(np.float32, copy=False)
            if not (np.isfinite(r).all() and np.isfinite(t).all()):
                keep = np.isfinite(r) & np.isfinite(t)
                r, t = r[keep], t[keep]
            err = r - t
            self.signal += float(np.dot(r, r))   # float32 BLAS: ample for a figure in dB
            self.noise += float(np.dot(err, err))

    def db(self) -> float:
        if self.noise == 0.0:
            return float("inf")
        if self.signal == 0.0:
            return float("-inf")
        return float(10.0 * np.log10(self.signal / self.noise))


def array_sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """SQNR in dB of ``test`` against ``ref`` over the positions finite in both (+inf when identical)."""
    s = SqnrSums()
    s.add(ref, test)
    return s.db()


def layer_tensors(model: ir.Model, weights: Sequence[WeightInfo]) -> dict[str, str]:
    """Float activation tensors around each weight's layer → their role, in graph order:
    every non-weight float input of a consumer node, then its float outputs."""
    weight_names = {w.name for w in weights}
    consumers = {c for w in weights for c in w.consumers}
    roles: dict[str, str] = {}
    for node in branch_nodes(model.graph):
        if node.name not in consumers:
            continue
        where = f"{node.op_type} '{node.name}'"
        for v in node.inputs:
            if v is not None and v.name and v.name not in weight_names and not v.is_initializer() and _is_float(v):
                roles.setdefault(v.name, f"input of {where}")
        for v in node.outputs:
            if v.name and _is_float(v):     # an omitted optional output has no name
                roles.setdefault(v.name, f"output of {where}")
    return roles


def _is_float(v: ir.Value) -> bool:
    return v.dtype is None or v.dtype.is_floating_point()


def quantizers(qmodel: ir.Model) -> dict[str, tuple[str, list[str]]]:
    """Tensor → (precision, the names whose value reconstructs its quantized form) in the emitted graph:
    ``[dq_output]`` for a static Q/DQ pair, ``[codes, scale, zero_point]`` for DynamicQuantizeLinear."""
    found: dict[str, tuple[str, list[str]]] = {}
    for node in branch_nodes(qmodel.graph):
        x = node.inputs[0] if node.inputs else None
        if x is None or x.name in found:
            continue
        if node.op_type == "DynamicQuantizeLinear":
            found[x.name] = ("int8 dynamic", [o.name for o in node.outputs])
        elif node.op_type == "QuantizeLinear" and not x.is_initializer():
            dq = next((c for c, _ in node.outputs[0].uses() if c.op_type == "DequantizeLinear"), None)
            if dq is not None:
                zp = node.inputs[2] if len(node.inputs) > 2 else None   # the codes' type, also without value_info
                bits = _STATIC_BITS.get(zp.dtype if zp is not None else node.outputs[0].dtype, 8)
                found[x.name] = (f"int{bits} static", [dq.outputs[0].name])
    return found


def _dequantized(values: list[np.ndarray]) -> np.ndarray:
    """The quantized form of a tensor from its exposed values (see :func:`quantizers`)."""
    if len(values) == 1:
        return values[0]
    codes, scale, zero_point = values
    return (codes.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def _folded_relus(model: ir.Model, qmodel: ir.Model, quant: dict[str, Any]) -> set[str]:
    """Quantized tensors whose float producer is a Relu that the rewrite folded into the quantizer's range:
    in the quantized graph the name carries the Relu's input, and the quantizer's clamp at 0 is the Relu."""
    def producers(m: ir.Model) -> dict[str, str]:
        return {v.name: node.op_type for node in branch_nodes(m.graph) for v in node.outputs}
    fp, qp = producers(model), producers(qmodel)
    return {t for t in quant if fp.get(t) == "Relu" and qp.get(t) != "Relu"}


def activation_errors(model: ir.Model, qmodel: ir.Model, weights: Sequence[WeightInfo],
                      batches: Sequence[Feed], providers: Sequence[str], splittable: bool = False
                      ) -> list[dict[str, Any]]:
    """One row per activation tensor around a weight's layer present in both graphs (see the module doc).

    ``splittable``: the batches may run in pieces of fewer samples (every input has a free sample axis 0),
    so that the exposed tensors of one run stay within :data:`cet_onnx.exposed.RUN_MAX_BYTES`.
    """
    qnames = {v.name for node in branch_nodes(qmodel.graph) for v in node.outputs} | {v.name for v in qmodel.graph.inputs}
    fnames = {v.name for node in branch_nodes(model.graph) for v in node.outputs} | {v.name for v in model.graph.inputs}
    quant = {t: q for t, q in quantizers(qmodel).items() if t in fnames}
    roles = {t: r for t, r in layer_tensors(model, weights).items() if t in qnames}
    roles.update({t: "quantized activation" for t in quant if t not in roles})
    if not roles or not batches:
        return []
    extra = [n for _, names in quant.values() for n in names]
    ref_sess = ExposedSession(model, roles, providers)
    stored = None
    if 4 * sum(w.size for w in weights) > SIDE_BY_SIDE_MAX_BYTES:
        stored = [ref_sess.run(feed) for feed in batches]
        ref_sess.close()   # one model in onnxruntime at a time, as verify does: hold the tensors instead
    q_sess = ExposedSession(qmodel, [*roles, *extra], providers, typed=False)
    rows = samples_per_run(batches[0], [ref_sess, q_sess]) if splittable and stored is None else None
    feeds = [piece for feed in batches for piece in pieces(feed, rows)]
    folded = _folded_relus(model, qmodel, quant)
    to_float, own = {t: SqnrSums() for t in roles}, {t: SqnrSums() for t in quant}
    for i, feed in enumerate(feeds):
        ref = stored[i] if stored is not None else ref_sess.run(feed)
        got = q_sess.run(feed)
        for t in roles:
            if t not in ref or t not in got or (t in quant and any(n not in got for n in quant[t][1])):
                continue
            if t not in quant:
                to_float[t].add(ref[t], got[t])
                continue
            seen = _dequantized([got[n] for n in quant[t][1]])
            to_float[t].add(ref[t], seen)
            own[t].add(np.maximum(got[t], 0) if t in folded else got[t], seen)
    gone = {*ref_sess.dropped, *q_sess.dropped}    # inside a Loop body onnxruntime could not return them from
    return [{"name": t, "kind": "activation", "role": role,
             "precision": quant[t][0] if t in quant else "float",
             "sqnr_db": to_float[t].db(),
             "quantizer_sqnr_db": own[t].db() if t in own else None}
            for t, role in roles.items() if not gone.intersection([t, *quant.get(t, ("", []))[1]])]


def weight_errors(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The weight rows of the report (each with its ``sqnr_db``) in the per-tensor form."""
    return [{"name": r["name"], "kind": "weight", "role": f"weight of {r['op']}", "precision": r["format"],
             "sqnr_db": r["sqnr_db"], "quantizer_sqnr_db": r["sqnr_db"],
             **({"sensitivity": r["predicted_delta_loss"]} if "predicted_delta_loss" in r else {})}
            for r in rows if "sqnr_db" in r]


def worst(rows: Sequence[dict[str, Any]], kind: str, n: int = 3) -> list[dict[str, Any]]:
    """The ``n`` rows of ``kind`` with the lowest SQNR against the float model."""
    return sorted((r for r in rows if r["kind"] == kind), key=lambda r: float(r["sqnr_db"]))[:n]   # "inf" in JSON
