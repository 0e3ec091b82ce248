"""Which weights' layers the calibration data never runs: every reader inside an ``If`` branch no batch took
(or a Loop / Scan body that never iterated).

Probes measure nothing for such a weight (its loss change is exactly 0), so a budget would give it the
fewest bits for free and the branch would be degraded without any evidence. The allocation keeps these
weights at 8 bits instead (:class:`~cet_onnx.allocation.allocate.Candidates`) where the budget allows, and the
report lists them (``allocation.unexercised_weights``) either way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from cet_onnx.errors import RuntimeFailure, first_line
from cet_onnx.graph.passes._graph import branch_nodes
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.exposed import ExposedSession
from cet_onnx.runner import Feed

#: where a tensor is that the calibration data never computes
NEVER_RUN = "inside an If branch no run took, or a Loop that never iterated"
WHY = f"its layer never runs on the calibration data ({NEVER_RUN}): kept at 8 bits"
NOT_KEPT = (f"its layer never runs on the calibration data ({NEVER_RUN}); "
            "the budget cannot keep it at 8 bits, so it was allocated with no measured cost")


def unexercised_weights(model: ir.Model, weights: Sequence[WeightInfo], batches: Sequence[Feed],
                        providers: Sequence[str]) -> dict[str, str]:
    """Weight → why (:data:`WHY`), for the weights whose readers are all inside If branches and all returned an
    empty output on every batch. No If, no run."""
    in_branch = {node.name: node for node in branch_nodes(model.graph)
                 if node.graph is not model.graph and node.name}
    probe = {w.name: [in_branch[c].outputs[0].name for c in w.consumers] for w in weights
             if w.consumers and all(c in in_branch and in_branch[c].outputs for c in w.consumers)}
    if not probe or not batches:
        return {}
    names = list(dict.fromkeys(name for outs in probe.values() for name in outs))
    session = ExposedSession(model, names, providers, typed=False)
    ran: set[str] = set()
    for feed in batches:
        try:
            values = session.run(feed)
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime failed while finding the If branches that run: {first_line(exc)}") from None
        ran.update(name for name, v in values.items() if np.asarray(v).size)
    ran.update(session.dropped)   # not observable: not known to be idle
    return {w: WHY for w, outs in probe.items() if not ran.intersection(outs)}
