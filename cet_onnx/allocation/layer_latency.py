"""Measured latency of every weight × candidate format: the solver's third resource (``--max-latency``).

A format's speed is not a property of its bits: onnxruntime runs an INT8 Conv group as
``QLinearConv`` (and a per-channel INT4 / INT2 one too, widened to INT8 at load), a blocked INT4 Conv
weight is dequantized on every run, a blocked INT4 MatMul weight
becomes ``MatMulNBits`` (faster with larger blocks), an INT2 one is slower than float on CPUs
without a 2-bit kernel. So each weight's layer is timed in each emitted form:

* the layer is the weight's consumer node alone (with a Relu that alone reads it: fused either
  way), cut out of the graph with its activation inputs as graph inputs, fed the activations the float model computes on the latency feed
  (``--latency-batch`` samples);
* each format's form is what :func:`cet_onnx.graph.rewriter.rewrite` emits for that layer (weight
  Q/DQ, the layer's activation Q/DQ in static mode, the dynamic MatMul in dynamic mode), with the
  weight rounded to nearest (codes do not change the speed);
* under a latency budget float is a format too (:mod:`.float_option`): the layer with its weight
  float and, in static mode, its activation Q/DQ as the rewrite leaves them;
* the float layer and every form run in turns (:func:`cet_onnx.latency.interleaved_ms`), and a
  format's cost is its median minus the float layer's: the change of the whole model's latency
  when that weight alone takes that format. A form whose weight onnxruntime dequantizes on every
  run (:func:`cet_onnx.kernels.inspect_kernels` on the layer) costs at least 0: it computes the
  float layer plus a DequantizeLinear, and where it timed faster alone the float layer was paying
  its own layout reorders (onnxruntime's NCHWc Convs, which a whole float graph chains). The model's predicted latency is the float model's
  measured latency plus the chosen formats' costs.

Results are cached on disk beside the probe results, keyed by everything they depend on (op,
attributes, shapes, formats, activation handling, onnxruntime version, providers, threads, CPU).
A weight with several consumers (a tied table) is not timed: its costs are 0, and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper, numpy_helper

from cet_onnx import __version__
from cet_onnx.allocation import cache as probe_cache
from cet_onnx.allocation.float_option import is_float
from cet_onnx.errors import InputError
from cet_onnx.graph.passes.extra_outputs import ExposeOutputsPass
from cet_onnx.graph.rewriter import rewrite
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.kernels import inspect_kernels
from cet_onnx.latency import cpu_name, interleaved_ms
from cet_onnx.progress import Progress
from cet_onnx.quant.quantizer import ActivationParams, WeightFormat, quantize_weight
from cet_onnx.runner import Feed, make_session

#: timing of one layer: fewer rounds and seconds than a whole model (there are many layers)
LAYER_ROUNDS = (10, 60, 1.0)   # min rounds, max rounds, seconds
_OUT = "__layer_output"
_METHOD = 4   # bump when the way a layer is cut out or timed changes: cached timings of another method are stale


@dataclass
class LayerLatencies:
    """Per weight × format: the measured change of the model's latency (ms; 0 for float-equal, nan where unavailable)."""

    delta_ms: np.ndarray
    float_layer_ms: list[float | None]
    untimed: dict[str, str] = field(default_factory=dict)   # weight → why it was not timed

    def as_report(self, weights: Sequence[WeightInfo], formats: Sequence[WeightFormat]) -> dict[str, Any]:
        return {w.name: {"float_layer_ms": self.float_layer_ms[i],
                         "delta_ms": {f.label: None if not np.isfinite(self.delta_ms[i, j]) else
                                      round(float(self.delta_ms[i, j]), 5) for j, f in enumerate(formats)}}
                for i, w in enumerate(weights)}


def layer_activations(model: ir.Model, weights: Sequence[WeightInfo], feed: Feed,
                      providers: Sequence[str]) -> dict[str, np.ndarray]:
    """Every non-constant input of every weight's consumer, computed by the float model on ``feed`` (one run)."""
    names = _activation_inputs(model.graph, weights)
    probe = ir.from_proto(ir.to_proto(model))
    ExposeOutputsPass([n for n in names if n not in feed], typed=False)(probe)
    session = make_session(probe, providers)
    wanted = [o.name for o in session.get_outputs() if o.name in names]
    values = dict(zip(wanted, session.run(wanted, feed)))
    values.update({n: feed[n] for n in names if n in feed})
    return values


def _activation_inputs(graph: ir.Graph, weights: Sequence[WeightInfo]) -> list[str]:
    nodes = {n.name: n for n in graph}
    found: dict[str, None] = {}
    for w in weights:
        for c in w.consumers:
            node = nodes.get(c)
            for v in (node.inputs if node is not None else ()):
                if v is not None and v.name and not v.is_initializer() and v.const_value is None:
                    found.setdefault(v.name)
    return list(found)


def _relu_after(node: ir.Node) -> ir.Node | None:
    """The Relu that alone reads ``node``'s output (part of the layer: fused into it, float or quantized)."""
    uses = list(node.outputs[0].uses()) if node.outputs else []
    if len(uses) == 1 and uses[0].node.op_type == "Relu" and uses[0].node.domain in ("", "ai.onnx") \
            and not node.outputs[0].is_graph_output():
        return uses[0].node
    return None


def _layer_model(model: ir.Model, node: ir.Node, w: WeightInfo, acts: dict[str, np.ndarray],
                 values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The consumer ``node`` (and a Relu after it) alone: activations as typed graph inputs, constants as
    initializers, the float weight."""
    inputs, inits = [], []
    for v in node.inputs:
        if v is None or not v.name:
            continue
        if v.name == w.name:
            inits.append(numpy_helper.from_array(np.asarray(values[w.name]), w.name))
        elif v.name in acts:
            a = acts[v.name]
            inputs.append(helper.make_tensor_value_info(v.name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape))
        elif v.const_value is not None:
            inits.append(numpy_helper.from_array(v.const_value.numpy(), v.name))
        else:
            raise ValueError(f"input '{v.name}' of '{node.name}' has no value")
    # each output leaves through an Identity, so that (in static mode) it gets the QuantizeLinear a graph output would not
    relu = _relu_after(node)
    body = [node] + ([relu] if relu is not None else [])
    outs = [o for o in body[-1].outputs if o.name]
    outputs = [helper.make_tensor_value_info(f"{o.name}{_OUT}", int(o.dtype or ir.DataType.FLOAT), None) for o in outs]
    tails = [helper.make_node("Identity", [o.name], [f"{o.name}{_OUT}"]) for o in outs]
    graph = helper.make_graph([ir.serde.serialize_node(n) for n in body] + tails, "layer", inputs, outputs, inits)
    opsets = [helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    m = helper.make_model(graph, opset_imports=opsets)
    m.ir_version = model.ir_version
    return m


def _cache_key(layer: onnx.ModelProto, w: WeightInfo, formats: Sequence[WeightFormat], acts_quantized: list[str],
               act_mode: str, providers: Sequence[str], threads: int, widen: bool = True) -> str:
    shapes = [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim], i.type.tensor_type.elem_type)
              for i in layer.graph.input]
    node = layer.graph.node[0]
    settings = {"op": node.op_type, "domain": node.domain, "attrs": [str(a) for a in node.attribute],
                "inputs": shapes, "weight": list(w.shape), "weight_input": list(node.input).index(w.name),
                "axes": [w.channel_axis, w.reduction_axis], "consts": [(t.name, list(t.dims)) for t in layer.graph.initializer],
                "formats": [f.label for f in formats], "acts": acts_quantized, "act_mode": act_mode, "widen": widen,
                "method": _METHOD, "version": __version__, "ort": ort.__version__, "providers": list(providers), "threads": threads,
                "cpu": [platform.machine(), os.cpu_count(), cpu_name()]}
    return "latency-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def measure_layer_latencies(model: ir.Model, weights: Sequence[WeightInfo], formats: Sequence[WeightFormat],
                            available: np.ndarray, values: dict[str, np.ndarray], feed: Feed,
                            act_params: dict[str, ActivationParams] | None, act_mode: str,
                            providers: Sequence[str], threads: int, cache_dir: Path | None,
                            widen: bool = True) -> LayerLatencies:
    """Time every weight's layer in float and in each available format (see the module docstring);
    ``widen``: low-bit codes widened for onnxruntime's INT8 kernels, as :func:`rewrite` writes them."""
    acts = layer_activations(model, weights, feed, providers)
    nodes = {n.name: n for n in model.graph}
    delta = np.where(available, 0.0, np.nan)
    float_ms: list[float | None] = [None] * len(weights)
    untimed: dict[str, str] = {}
    bar = Progress(len(weights), "latency costs", "weight")
    try:
        for i, w in enumerate(weights):
            bar.update()
            if len(w.consumers) != 1 or w.consumers[0] not in nodes:
                untimed[w.name] = "read by several nodes (or through a Transpose): not timed, cost 0"
                continue
            node = nodes[w.consumers[0]]
            layer = _layer_model(model, node, w, acts, values)
            relu = _relu_after(node)
            names = {v.name for v in node.inputs if v is not None} | {o.name for o in node.outputs} | \
                ({relu.outputs[0].name} if relu is not None else set())
            layer_acts = {k: v for k, v in (act_params or {}).items() if k in names}
            fmts = [j for j in range(len(formats)) if available[i, j]]
            key = _cache_key(layer, w, [formats[j] for j in fmts], sorted(layer_acts), act_mode, providers, threads,
                             widen)
            entry = probe_cache.load(cache_dir, key) if cache_dir is not None else None
            if entry is None:
                entry = _time_layer(layer, w, [formats[j] for j in fmts], values, layer_acts, act_mode, acts,
                                    providers, threads, widen)
                if cache_dir is not None:
                    probe_cache.store(cache_dir, key, entry)
            float_ms[i] = entry["float_ms"]
            for j, d in zip(fmts, entry["delta_ms"]):
                delta[i, j] = d
    finally:
        bar.close()
    return LayerLatencies(delta, float_ms, untimed)


def _time_layer(layer: onnx.ModelProto, w: WeightInfo, formats: Sequence[WeightFormat], values: dict[str, np.ndarray],
                layer_acts: dict[str, ActivationParams], act_mode: str, acts: dict[str, np.ndarray],
                providers: Sequence[str], threads: int, widen: bool = True) -> dict[str, Any]:
    base = ir.from_proto(layer)
    feed = {i.name: acts[i.name] for i in layer.graph.input}
    sessions, feeds, dequantized = [make_session(layer, providers, threads=threads)], [feed], []
    for f in formats:
        qweights = {} if is_float(f) else \
            {w.name: quantize_weight(np.asarray(values[w.name], np.float32), f, w.channel_axis, w.reduction_axis)}
        emitted = rewrite(base, [w], qweights, layer_acts or None, dynamic=act_mode == "dynamic", widen=widen).model
        proto, qfeed = deployed_boundary(ir.to_proto(emitted), feed, layer_acts)
        sessions.append(make_session(proto, providers, threads=threads))
        feeds.append(qfeed)
        dequantized.append(bool(qweights) and bool(inspect_kernels(proto, providers).dequantized_at_run_time))
    ms, _ = interleaved_ms(sessions, feeds, *LAYER_ROUNDS)
    # a weight dequantized on every run computes the float layer plus a DequantizeLinear: it is never faster in
    # the whole graph, and a faster isolated timing is the float layer paying its own layout reorders (NCHWc)
    return {"float_ms": ms[0], "delta_ms": [max(m - ms[0], 0.0) if d else m - ms[0] for m, d in zip(ms[1:], dequantized)],
            "dequantized": dequantized}


def deployed_boundary(model: onnx.ModelProto, feed: Feed, act_params: dict[str, ActivationParams]
                      ) -> tuple[onnx.ModelProto, Feed]:
    """The layer as it runs inside the quantized model: an input with activation Q/DQ arrives already quantized
    (its QuantizeLinear belongs to the producer, fused there) and an output with Q/DQ leaves quantized (its
    DequantizeLinear belongs to the consumer). Without this an INT8 layer would pay a QuantizeLinear and a
    DequantizeLinear of its own that the deployed graph does not run, and never fuse into QLinearConv."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    feed = dict(feed)
    drop: list[onnx.NodeProto] = []
    for inp in list(g.input):
        q = next((n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == inp.name), None)
        p = act_params.get(inp.name)
        readers = sum(n.input[:].count(inp.name) for n in g.node)
        if q is None or p is None or readers != 1:
            continue
        codes = np.clip(np.round(feed.pop(inp.name) / p.scale) + p.zero_point, *_int_range(p.dtype)).astype(p.dtype)
        feed[q.output[0]] = codes
        inp.CopyFrom(helper.make_tensor_value_info(q.output[0], helper.np_dtype_to_tensor_dtype(codes.dtype), codes.shape))
        drop.append(q)
    for out in g.output:
        tail = producers.get(out.name)
        dq = producers.get(tail.input[0]) if tail is not None and tail.op_type == "Identity" else None
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue
        dtype = {np.dtype(np.uint8): onnx.TensorProto.UINT8, np.dtype(np.int8): onnx.TensorProto.INT8,
                 np.dtype(np.uint16): onnx.TensorProto.UINT16, np.dtype(np.int16): onnx.TensorProto.INT16}
        p = act_params.get(q.input[0])
        out.CopyFrom(helper.make_tensor_value_info(q.output[0], dtype[np.dtype(p.dtype)] if p else onnx.TensorProto.UINT8,
                                                   None))
        drop += [dq, tail]
    kept = [n for n in g.node if all(n is not d for d in drop)]
    del g.node[:]
    g.node.extend(kept)
    return model, feed


def _int_range(dtype: Any) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def require_in_memory(model: ir.Model, on_disk: bool) -> None:
    """A latency budget times every layer in onnxruntime; a model whose weights stay on disk is not supported yet."""
    if on_disk:
        raise InputError("--max-latency / --max-latency-ratio: not supported for a model whose weights stay on disk "
                         "(over the in-memory limit); use a size or loss budget alone")
