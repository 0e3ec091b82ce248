"""The graph transformations, one ``onnx_ir`` pass per module (each with its tests beside it).

:mod:`cet_onnx.graph.rewriter` composes them into the QDQ rewrite; the loader and the probe /
calibration stages use the others directly.
"""
