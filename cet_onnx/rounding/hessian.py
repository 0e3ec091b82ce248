"""Layer Hessians ``H = X Xᵀ`` of each weight's inputs, streamed from onnxruntime.

For Gemm / MatMul the rows of ``X`` are the input vectors; for a 2-D Conv they are the im2col
patches of its input (one Hessian per group, so depthwise convs get one small Hessian per
channel). Batches are streamed: only the running ``H`` (and one batch of layer inputs) is in
memory, and at most ``max_rows`` patch rows per batch are used (a random subset) to bound the
cost on large feature maps.

Layers whose rows cannot be formed (ConvTranspose, 1-D/3-D convs, batched MatMul weights)
have no Hessian and keep round-to-nearest; :func:`layer_spec` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.calibration import padding
from cet_onnx.errors import RuntimeFailure, first_line
from cet_onnx.progress import track
from cet_onnx.graph.passes._graph import branch_nodes
from cet_onnx.exposed import ExposedSession
from cet_onnx.graph.passes.extra_outputs import per_iteration, stack_depth
from cet_onnx.rounding.row_counts import RowCounts
from cet_onnx.runner import Feed
from cet_onnx.graph.weights import WeightInfo


@dataclass
class LayerSpec:
    """How weight ``name`` multiplies its input, and where that input comes from."""

    name: str
    kind: str                    # "conv2d" | "linear"
    input_tensor: str
    transpose_input: bool = False  # linear: X = inputᵀ (Gemm transA, or the weight is MatMul's A)
    weight_is_a: bool = False      # the weight is the left operand (y = W·x)
    group: int = 1
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)   # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    auto_pad: str = "NOTSET"
    stacked: int = 0               # Loop / Scan bodies around the layer: leading iteration axes of its observed input


def hessian_nbytes(w: WeightInfo, spec: LayerSpec) -> int:
    """Bytes of ``w``'s float64 Hessians: one (columns × columns) matrix per group."""
    cols = w.shape[w.reduction_axis] * (spec.kernel[0] * spec.kernel[1] if spec.kind == "conv2d" else 1)
    return 8 * (spec.group if spec.kind == "conv2d" else 1) * cols * cols


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def layer_spec(model: ir.Model, w: WeightInfo) -> tuple[LayerSpec | None, str]:
    """The spec of ``w``'s first consumer in ``model``, or None and the reason it has none.

    A ``Cast`` of the weight (a half-precision weight fed as float32 to a probe model) and a 2-D
    ``Transpose`` (a tied LM head, whose ``x @ Eᵀ`` has the same rows as ``E``) are looked
    through; a Gather use is passed over when another use has a layer input.
    """
    target, gather = w.name, False
    for node in branch_nodes(model.graph):
        names = [v.name if v is not None else "" for v in node.inputs]
        if target not in names:
            continue
        if node.op_type == "Cast" or (node.op_type == "Transpose" and len(w.shape) == 2):
            target = node.outputs[0].name
            continue
        if node.op_type == "Gather" and len(w.consumers) > 1:
            gather = True
            continue
        spec, why = _spec_at(node, names.index(target), names, w)
        if spec is not None:
            spec.stacked = stack_depth(model.graph, node.graph)
        return spec, why
    return None, "Gather weight" if gather else "no layer reads it"


def _spec_at(node: ir.Node, idx: int, names: list[str], w: WeightInfo) -> tuple[LayerSpec | None, str]:
    """The spec of ``w`` as input ``idx`` of ``node`` (input names ``names``), or None and why."""
    if node.op_type == "Conv":
        if len(w.shape) != 4:
            return None, f"{len(w.shape) - 2}-D convolution"
        pads = tuple(_attr(node, "pads", (0, 0, 0, 0)))
        return LayerSpec(w.name, "conv2d", names[0], group=int(_attr(node, "group", 1)),
                         kernel=(w.shape[2], w.shape[3]), strides=tuple(_attr(node, "strides", (1, 1))),
                         pads=(pads[0], pads[1], pads[2], pads[3]),
                         dilations=tuple(_attr(node, "dilations", (1, 1))),
                         auto_pad=_attr(node, "auto_pad", "NOTSET")), ""
    if node.op_type == "Gemm":
        if idx == 1:
            return LayerSpec(w.name, "linear", names[0], transpose_input=bool(_attr(node, "transA", 0))), ""
        return None, "Gemm weight as left operand"
    if node.op_type == "MatMul":
        if len(w.shape) != 2:
            return None, "batched MatMul weight"
        if idx == 1:
            return LayerSpec(w.name, "linear", names[0]), ""
        return LayerSpec(w.name, "linear", names[1], transpose_input=True, weight_is_a=True), ""
    return None, f"{node.op_type} weight"


def to_rows(w: np.ndarray, info: WeightInfo) -> np.ndarray:
    """The weight as ``[output rows, input columns]`` in the column order of the layer's ``X``."""
    if w.ndim == 4:
        return w.reshape(w.shape[0], -1)
    return np.moveaxis(w, info.channel_axis, 0).reshape(w.shape[info.channel_axis], -1)


def from_rows(w2: np.ndarray, shape: tuple[int, ...], info: WeightInfo) -> np.ndarray:
    """Inverse of :func:`to_rows`."""
    if len(shape) == 4:
        return w2.reshape(shape)
    moved = list(shape)
    c = info.channel_axis
    moved.insert(0, moved.pop(c))
    return np.moveaxis(w2.reshape(moved), 0, c)


def _conv_pads(spec: LayerSpec, h: int, w: int) -> tuple[int, int, int, int]:
    if spec.auto_pad in ("NOTSET", ""):
        return spec.pads
    if spec.auto_pad == "VALID":
        return (0, 0, 0, 0)
    pads = []
    for size, k, s, d in ((h, spec.kernel[0], spec.strides[0], spec.dilations[0]),
                          (w, spec.kernel[1], spec.strides[1], spec.dilations[1])):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        pads.append((total // 2, total - total // 2) if spec.auto_pad == "SAME_UPPER" else (total - total // 2, total // 2))
    return (pads[0][0], pads[1][0], pads[0][1], pads[1][1])


def conv_patches(x: np.ndarray, spec: LayerSpec, rows: np.ndarray | None = None) -> np.ndarray:
    """im2col of ``x`` ``[N, C, H, W]`` as ``[groups, N·oh·ow, (C/g)·kh·kw]``.

    ``rows``: indices into the ``N·oh·ow`` output positions to keep (see :func:`patch_count`);
    only those patches are copied out of the strided window view.
    """
    win = _windows(x, spec)                                         # [N, oh, ow, C, kh, kw], a view
    n, oh, ow, c, kh, kw = win.shape
    if rows is not None:
        win = win[np.unravel_index(rows, (n, oh, ow))]              # [M, C, kh, kw]
    g = spec.group
    win = win.reshape(-1, g, (c // g) * kh * kw)
    return np.ascontiguousarray(win.transpose(1, 0, 2))


def patch_count(x: np.ndarray, spec: LayerSpec) -> int:
    """Rows of :func:`conv_patches` for ``x`` (``N·oh·ow``)."""
    return int(np.prod(_windows(x, spec).shape[:3]))


def _windows(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """Sliding windows of the padded ``x``: ``[N, oh, ow, C, kh, kw]`` (a view of one padded copy)."""
    n, c, h, wd = x.shape
    top, left, bottom, right = _conv_pads(spec, h, wd)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw].transpose(0, 2, 3, 1, 4, 5)


def linear_rows(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """Input vectors of a Gemm / MatMul as rows ``[samples, K]``."""
    if spec.transpose_input:
        x = np.swapaxes(x, -1, -2)
    return x.reshape(-1, x.shape[-1])


def real_tokens(x: np.ndarray, spec: LayerSpec, tokens: np.ndarray | None) -> np.ndarray:
    """A Gemm / MatMul input ``[batch, sequence, K]`` at its real tokens only (``[tokens, K]``).

    A transformer's padded positions carry vectors no output reads; counted in ``XᵀX`` they would
    pull the rounding towards them (55 % of the positions of the MiniLM calibration sentences of
    ``tools/minilm_data.py`` are padding). Other layer inputs are returned as they are.
    """
    if spec.kind == "conv2d" or spec.transpose_input or spec.weight_is_a or spec.stacked or x.ndim not in (2, 3):
        return x
    return padding.at_tokens(x, tokens)


@dataclass
class LayerHessian:
    """Running ``H`` per group, and the number of rows seen."""

    spec: LayerSpec
    h: list[np.ndarray] = field(default_factory=list)
    rows: int = 0
    unobserved: str = ""     # why the layer's input could not be observed (then no rows)

    def update(self, x: np.ndarray, rng: np.random.Generator, max_rows: int) -> None:
        conv = self.spec.kind == "conv2d"
        count = patch_count(x, self.spec) if conv else linear_rows(x, self.spec).shape[0]
        pick = np.sort(rng.choice(count, max_rows, replace=False)) if count > max_rows else None
        if conv:
            parts = conv_patches(x, self.spec, pick)
        else:
            rows = linear_rows(x, self.spec)
            parts = (rows if pick is None else rows[pick])[None]
        if not self.h:
            self.h = [np.zeros((parts.shape[2], parts.shape[2])) for _ in range(parts.shape[0])]
        for k, p in enumerate(parts):
            p = np.ascontiguousarray(p, dtype=np.float32)
            pt = p.T
            step = max(1, 2**22 // max(p.shape[1], 1))   # bounds the float32 temporary to 16 MB
            for j in range(0, p.shape[1], step):
                self.h[k][:, j:j + step] += pt @ p[:, j:j + step]  # float32 product, float64 running sum
        self.rows += parts.shape[1]

    @property
    def columns(self) -> int:
        """Columns of each group's Hessian (the layer's inputs per output, times the kernel size)."""
        return self.h[0].shape[0] if self.h else 0

    def hessians(self) -> list[np.ndarray]:
        """``2/rows · X Xᵀ`` per group (the scale does not change the rounding).

        Scales the running sums in place and hands them over (no second copy of large
        Hessians); the accumulator is empty afterwards.
        """
        out, self.h = self.h, []
        for h in out:
            h *= 2.0 / max(self.rows, 1)
        return out


def collect_hessians(probe: ir.Model, specs: Sequence[LayerSpec], batches: Sequence[Feed],
                     weight_feeds: dict[str, np.ndarray], providers: Sequence[str], max_rows: int = 8192,
                     seed: int = 0, desc: str = "layer Hessians", gathers: Mapping[str, tuple[str, int]] | None = None
                     ) -> dict[str, LayerHessian | RowCounts]:
    """Hessians of every spec's layer, one streamed pass over ``batches`` (take them with ``.hessians()``).

    ``probe`` is the deployed graph with weights as inputs (see :func:`cet_onnx.allocation.probes.probe_model`);
    ``weight_feeds`` gives the value of each weight that ``probe`` takes as a graph input (already
    quantized ones, for a sequential pass); the other weights are the probe's own initializers.
    ``gathers``: embedding table → (its indices tensor, its rows); their lookups are counted in the
    same pass (:class:`~cet_onnx.rounding.row_counts.RowCounts`).
    """
    gathers = dict(gathers or {})
    if not specs and not gathers:
        return {}
    inputs = {v.name for v in probe.graph.inputs}
    exposed = [s.input_tensor for s in specs] + [t for t, _ in gathers.values() if t not in inputs]
    session = ExposedSession(probe, exposed, providers, typed=False, optimize=True)
    layers: dict[str, LayerHessian | RowCounts] = {s.name: LayerHessian(s) for s in specs}
    layers.update({name: RowCounts(rows) for name, (_, rows) in gathers.items()})
    rng = np.random.default_rng(seed)
    for feed in track(batches, desc=desc, unit="batch"):
        try:
            values = session.run({**feed, **weight_feeds})
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime failed while collecting layer inputs: {first_line(exc)}") from None
        tokens = padding.token_mask(feed)
        for name, (tensor, _) in gathers.items():
            indices = feed[tensor] if tensor in inputs else values.get(tensor)
            if indices is not None and np.size(indices):
                layers[name].update(indices, tokens)
        for layer in layers.values():
            if isinstance(layer, RowCounts):
                continue
            x = np.asarray(values.get(layer.spec.input_tensor, np.zeros(0)), dtype=np.float32)
            if x.size:   # empty: inside an If branch this batch did not take, or a Loop that ran no iteration
                for part in per_iteration(real_tokens(x, layer.spec, tokens), layer.spec.stacked):
                    layer.update(part, rng, max_rows)
    session.close()  # it holds the model's weights
    for layer in layers.values():
        if isinstance(layer, LayerHessian) and layer.spec.input_tensor in session.dropped:
            layer.h, layer.rows = [], 0
            layer.unobserved = f"its layer input '{layer.spec.input_tensor}' is {session.dropped[layer.spec.input_tensor]}"
    return layers


def groups_rows(info: WeightInfo, spec: LayerSpec, ngroups: int) -> list[slice]:
    """Row ranges of :func:`to_rows`'s matrix that each group's Hessian belongs to."""
    rows = info.shape[info.channel_axis] if len(info.shape) != 4 else info.shape[0]
    per = rows // ngroups
    return [slice(k * per, (k + 1) * per) for k in range(ngroups)]


def quadratic_error(delta: np.ndarray, info: WeightInfo, spec: LayerSpec, hessians: Sequence[np.ndarray]) -> float:
    """``Σ_groups tr(δ_g H_g δ_gᵀ)``: the layer-output error ``‖δ X‖²`` (times ``2/rows``) of a weight error ``δ``.

    ``delta`` has the weight's shape; ``hessians`` are the layer's (one per convolution group),
    as :meth:`LayerHessian.hessians` returns them. Float64 throughout.
    """
    d2 = to_rows(np.asarray(delta, dtype=np.float64), info)
    total = 0.0
    for rows, h in zip(groups_rows(info, spec, len(hessians)), hessians):
        d = d2[rows]
        total += float(np.einsum("ij,ij->", d @ h, d))
    return total
