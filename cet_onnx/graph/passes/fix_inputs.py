"""Pass: freeze graph inputs to constants (``--fix-input NAME=VALUE``), so that simplification can fold
what depends on them away (an ``If`` on a sample rate or a mode flag becomes its taken branch).

Rules, for each ``NAME=VALUE``:

* ``NAME`` must be a graph input without an initializer;
* ``VALUE`` is one number for a scalar input, or as many comma-separated numbers as a fixed-shape
  input has elements (row-major); it is converted to the input's element type exactly (an
  integer input takes integers, a bool input ``0``/``1``/``true``/``false``);
* the input leaves the graph's inputs, and everything that read it reads a new initializer
  ``NAME_fixed`` holding the value.

Anything else is an :class:`~cet_onnx.errors.InputError` naming the input and what was expected.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx_ir as ir

from cet_onnx.errors import InputError
from cet_onnx.graph.names import UniqueNames
from cet_onnx.graph.passes._graph import initializer
from cet_onnx.graph.tensors import array_tensor


class FixInputsPass(ir.passes.InPlacePass):
    """Inputs named in ``values`` (name → the text after ``=``) become constants; ``fixed`` holds each one's
    declaration (the graph input taken out) and value."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__()
        self.values = dict(values)
        self.fixed: dict[str, tuple[ir.Value, np.ndarray]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs if v.name not in graph.initializers}
        names = UniqueNames(graph)
        for name, text in self.values.items():
            if name not in inputs:
                raise InputError(f"--fix-input {name}={text}: the model has no input '{name}' "
                                 f"(inputs: {', '.join(inputs) or 'none'})")
            value = inputs[name]
            array = parse_value(value, text)
            fresh = names.value(f"{name}_fixed")
            const = initializer(graph, fresh, array_tensor(fresh, array))
            value.replace_all_uses_with(const, replace_graph_outputs=True)
            graph.inputs.remove(value)
            self.fixed[name] = (value, array)
        return ir.passes.PassResult(model, modified=bool(self.fixed))


def parse_value(value: ir.Value, text: str) -> np.ndarray:
    """``text`` as an array of ``value``'s element type and shape (module rules)."""
    where = f"--fix-input {value.name}={text}"
    if value.dtype is None or value.shape is None:
        raise InputError(f"{where}: input '{value.name}' declares no element type or shape")
    dims = list(value.shape)
    if not all(isinstance(d, int) for d in dims):
        raise InputError(f"{where}: input '{value.name}' has dynamic dimensions {value.shape}; only inputs of a "
                         "fixed shape (a scalar, usually) can be fixed")
    dtype = np.dtype(value.dtype.numpy())
    parts = [p.strip() for p in text.split(",")]
    count = int(np.prod(dims, dtype=np.int64))
    if len(parts) != count:
        raise InputError(f"{where}: input '{value.name}' has shape {[int(d) for d in dims]} ({count} value(s)), "
                         f"got {len(parts)}")
    try:
        numbers = [_number(p, dtype) for p in parts]
    except ValueError:
        raise InputError(f"{where}: expected {dtype.name} value(s) for input '{value.name}'") from None
    return np.array(numbers, dtype=dtype).reshape([int(d) for d in dims])


def _number(text: str, dtype: np.dtype) -> int | float | bool:
    """One number of ``dtype`` from its text; ValueError when it is not one (or not exactly one)."""
    if dtype.kind == "b":
        lowered = text.lower()
        if lowered not in ("0", "1", "true", "false"):
            raise ValueError(text)
        return lowered in ("1", "true")
    if dtype.kind in "iu":
        number = int(text)
        info = np.iinfo(dtype)
        if not info.min <= number <= info.max:
            raise ValueError(text)
        return number
    if dtype.kind == "f":
        return float(text)
    raise ValueError(text)
