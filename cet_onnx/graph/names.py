"""Fresh value and node names that cannot collide with the graph's own.

Passes add initializers, nodes and tensors named after the tensor they serve
(``W_quantized``, ``t_QuantizeLinear``...). Reports list some of these names, so the
preferred name is always used when it is free; only a collision gets a numeric suffix
(``W_quantized_1``, ``W_quantized_2``...). Every name in the graph counts as taken, those of
subgraphs too (a subgraph may read an outer name, which a new value must not shadow).
"""

from __future__ import annotations

import onnx_ir as ir


def _graph_names(graph: ir.Graph) -> tuple[set[str], set[str]]:
    values: set[str] = set()
    nodes: set[str] = set()
    for g in (graph, *graph.subgraphs()):
        values.update(v.name for v in g.inputs if v.name)
        values.update(v.name for v in g.outputs if v.name)
        values.update(name for name in g.initializers if name)
        for node in g:
            if node.name:
                nodes.add(node.name)
            values.update(v.name for v in (*node.inputs, *node.outputs) if v is not None and v.name)
    return values, nodes


class UniqueNames:
    """Hands out value and node names unused in ``graph`` (and by earlier calls)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._values, self._nodes = _graph_names(graph)

    @staticmethod
    def _fresh(preferred: str, taken: set[str]) -> str:
        name, k = preferred, 0
        while name in taken:
            k += 1
            name = f"{preferred}_{k}"
        taken.add(name)
        return name

    def value(self, preferred: str) -> str:
        """``preferred`` if no value has that name yet, else ``preferred_<k>`` for the first free k."""
        return self._fresh(preferred, self._values)

    def node(self, preferred: str) -> str:
        """Like :meth:`value`, for node names."""
        return self._fresh(preferred, self._nodes)

