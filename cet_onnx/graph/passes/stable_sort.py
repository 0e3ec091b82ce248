"""Pass: stable topological order of the main graph.

Rule: Kahn's algorithm that always takes the earliest node (in the current order) whose inputs
are ready; a graph already in topological order is left exactly as it is, and a misplaced
node moves only as far as it must. The rewriter has always ended with this sort; onnx-ir's
``TopologicalSortPass`` (also stable) is not used because it sorts subgraphs too and would
have to be shown to break ties the same way.
"""

from __future__ import annotations

import heapq

import onnx_ir as ir


def stable_order(nodes: list[ir.Node]) -> list[ir.Node]:
    """``nodes`` in the stable topological order; raises ValueError on a cycle."""
    produced = {v for n in nodes for v in n.outputs}
    indeg = []
    waiting: dict[ir.Value, list[int]] = {}
    for i, node in enumerate(nodes):
        missing = {v for v in node.inputs if v is not None and v in produced}
        indeg.append(len(missing))
        for v in missing:
            waiting.setdefault(v, []).append(i)
    ready = [i for i, d in enumerate(indeg) if d == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for v in nodes[i].outputs:
            for j in waiting.pop(v, []):
                indeg[j] -= 1
                if indeg[j] == 0:
                    heapq.heappush(ready, j)
    if len(ordered) != len(nodes):
        raise ValueError("graph has a cycle after rewriting")
    return ordered


class StableTopologicalSortPass(ir.passes.InPlacePass):
    """Reorders the main graph's nodes as :func:`stable_order` says."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = list(graph)
        ordered = stable_order(nodes)
        modified = any(a is not b for a, b in zip(nodes, ordered))
        if modified:
            graph.remove(nodes)
            graph.extend(ordered)
        return ir.passes.PassResult(model, modified=modified)
