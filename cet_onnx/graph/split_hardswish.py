"""Where :func:`decompose_hardswish` used to live; the pass is :mod:`cet_onnx.graph.passes.split_hardswish`."""

from cet_onnx.graph.passes.split_hardswish import SplitHardSwishPass, decompose_hardswish  # noqa: F401
