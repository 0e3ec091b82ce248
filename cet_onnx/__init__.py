"""cet-onnx: per-weight mixed-precision post-training quantization of ONNX models.

Python API::

    from cet_onnx import QuantizeOptions, quantize
    report = quantize("model.onnx", "model.int8.onnx", "calib.npz", QuantizeOptions(weight_bits=8))
"""

__version__ = "0.1.0"

from cet_onnx.errors import CetError, InputError, RuntimeFailure  # noqa: E402
from cet_onnx.pipeline import QuantizeOptions, quantize  # noqa: E402

__all__ = ["CetError", "InputError", "QuantizeOptions", "RuntimeFailure", "quantize", "__version__"]
