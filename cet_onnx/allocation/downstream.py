"""Downstream-only probes: a weight's probe runs only the part of the model after it.

A one-sided probe perturbs one weight; everything before that weight's layer computes exactly
what the float model computes. So, per weight, the probe graph is cut down to a **suffix model**
(:class:`~cet_onnx.graph.passes.downstream.DownstreamPass`): the tensors that cross the cut (the
layer's input, residual branches, the model inputs a later node reads) become its inputs, computed
once from the whole probe graph on the probe batches, and each probe of that weight runs only the
suffix. The probe's cost is the suffix's loss with the perturbed weight minus the suffix's own loss
with the float weight (one extra suffix pass per weight): onnxruntime may fuse the suffix's first
layer differently from the whole graph, and the difference must not leak into the cost.

Memory is bounded: the cut tensors of all probe batches are held for one **group** of consecutive
weights at a time, at most :data:`CACHE_BYTES` (a weight whose cut alone is larger runs the whole
model). The groups are fixed by the tensor sizes of the first batch before any probe runs, so every
process (``--workers``, Ray actors) computes the same cut tensors with the same exposed graph, and
gets the same costs as a serial run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import onnx
import onnx_ir as ir

from cet_onnx.exposed import ExposedSession
from cet_onnx.graph import boundary
from cet_onnx.graph.boundary import Model
from cet_onnx.graph.passes.downstream import DownstreamPass, NotDownstream, downstream_cut
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.runner import Feed

#: bytes of cut tensors (all probe batches) held at a time
CACHE_BYTES = 2**28


@dataclass
class Suffix:
    """One weight's suffix model: the graph (weights as placeholders), the weights it reads, its feeds."""

    template: bytes
    weights: list[str]
    feeds: list[Feed]
    base: float | None = field(default=None)   # the suffix's loss with float weights, set on first use


class DownstreamProbes:
    """Suffix models and cut tensors for the one-sided probes of one probe graph (module docstring)."""

    def __init__(self, deployed: Model, placeholders: bytes, weights: Sequence[WeightInfo], output: str,
                 batches: Sequence[Feed], providers: Sequence[str], cache_bytes: int = CACHE_BYTES) -> None:
        """``placeholders``: ``deployed`` serialized with every weight a placeholder
        (:func:`~cet_onnx.allocation.probes.constant_weights_model`), which each suffix is cut from."""
        self.deployed = deployed
        self.placeholders = placeholders
        self.output = output
        self.batches = list(batches)
        self.providers = list(providers)
        self.cache_bytes = cache_bytes
        graph = boundary.to_ir(deployed).graph
        self._inputs = {v.name for v in graph.inputs}
        self._weights = {w.name for w in weights}
        self._cuts: dict[str, list[str]] = {}
        for w in weights:
            try:
                self._cuts[w.name] = [v.name for v in downstream_cut(graph, [w.name], output)[1]]
            except NotDownstream:
                pass
        self._groups: list[list[str]] | None = None
        #: bytes of each cut tensor over all batches (its first batch's times the batches), set with the groups
        self.sizes: dict[str, int] = {}
        self._current: dict[str, Suffix] = {}
        self._templates: dict[str, tuple[bytes, list[str]]] = {}   # each suffix graph is cut once

    def suffix(self, name: str) -> Suffix | None:
        """Weight ``name``'s suffix with its feeds, or None where the whole model must run."""
        if name in self._current:
            return self._current[name]
        try:
            group = next((g for g in self.partition() if name in g), None)
            if group is None:
                return None
            self._current = {}   # one group's cut tensors in memory at a time
            self._current = self._load(group)
        except Exception:   # a graph onnxruntime cannot cut here: every process falls back alike, to the whole model
            self._groups, self._current = [], {}
            return None
        return self._current[name]

    def partition(self) -> list[list[str]]:
        """The groups of weights whose cut tensors are held together (fixed on first use)."""
        if self._groups is None:
            self._groups = self._partition()
        return self._groups

    def release(self) -> None:
        """Drop the cut tensors held for the probes."""
        self._current = {}

    def cut_tensors(self, group: Sequence[str]) -> list[str]:
        """The tensors (besides model inputs) that cross the cuts of ``group``'s weights."""
        return sorted({t for w in group for t in self._cuts[w] if t not in self._inputs})

    def suffixes(self, group: Sequence[str], computed: Sequence[Feed]) -> dict[str, Suffix]:
        """The suffixes of ``group`` fed with ``computed``: per probe batch, the values of
        :meth:`cut_tensors` from a run of the whole graph (with other weights than the float ones, say)."""
        out = {}
        for w in group:
            feeds = [{t: (b[t] if t in self._inputs else c[t]) for t in self._cuts[w]}
                     for b, c in zip(self.batches, computed)]
            if w not in self._templates:
                self._templates[w] = self._template(w, feeds[0] if feeds else {})
            out[w] = Suffix(*self._templates[w], feeds)
        return out

    def _partition(self) -> list[list[str]]:
        """Consecutive weights whose cut tensors over all batches fit :attr:`cache_bytes` together."""
        names = sorted({t for cut in self._cuts.values() for t in cut if t not in self._inputs})
        if not self.batches:
            return []
        first = ExposedSession(self.deployed, names, self.providers, typed=False, optimize=True).run(self.batches[0]) \
            if names else {}
        self.sizes = size = {t: first[t].nbytes * len(self.batches) for t in names}
        groups: list[list[str]] = []
        held: set[str] = set()
        for w, cut in self._cuts.items():
            own = {t for t in cut if t not in self._inputs}
            if sum(size[t] for t in own) > self.cache_bytes:
                continue
            if not groups or sum(size[t] for t in held | own) > self.cache_bytes:
                groups.append([])
                held = set()
            groups[-1].append(w)
            held |= own
        return groups

    def _load(self, group: list[str]) -> dict[str, Suffix]:
        """The suffixes of ``group`` with their cut tensors, from one exposed run of the probe graph per batch."""
        names = self.cut_tensors(group)
        session = ExposedSession(self.deployed, names, self.providers, typed=False, optimize=True) if names else None
        computed = [session.run(feed) if session else {} for feed in self.batches]
        session = None
        return self.suffixes(group, computed)

    def _template(self, name: str, feed: Feed) -> tuple[bytes, list[str]]:
        """The suffix graph of ``name`` with every weight it reads a placeholder, and those weights' names;
        a cut tensor the graph declares no type for takes that of its value in ``feed``. Cut from the
        placeholder graph, so that no weight is copied."""
        m = ir.serde.deserialize_model(onnx.ModelProto.FromString(self.placeholders))
        DownstreamPass([name], self.output)(m)
        for v in m.graph.inputs:
            if v.type is None and v.name in feed:
                v.type = ir.TensorType(ir.DataType.from_numpy(feed[v.name].dtype))
        return ir.to_proto(m).SerializeToString(), [n for n in m.graph.initializers if n in self._weights]
