"""What the stages after calibration work on: the model, its weights, the data and the rounding plan."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from cet_onnx.calibration.data import ModelInput
from cet_onnx.graph.weights import WeightInfo
from cet_onnx.quant.quantizer import ActivationParams, RoundingPlan
from cet_onnx.timer import Timer


@dataclass
class Prepared:
    """Everything the stages after calibration need (built by :func:`cet_onnx.pipeline.prepare`)."""

    model: ir.Model
    inputs: list[ModelInput]
    weights: list[WeightInfo]
    skipped: dict[str, str]
    values: dict[str, np.ndarray]
    calib_samples: list
    verify_samples: list
    batch_size: int
    calib_batches: list
    verify_batches: list
    act_params: dict[str, ActivationParams] | None
    providers: list[str]
    labels: np.ndarray | None
    timer: Timer = field(default_factory=Timer)
    rounding: str = "rtn"
    roundings: RoundingPlan = field(default_factory=RoundingPlan)
    rtn_fallback: dict = field(default_factory=dict)     # weight → why it keeps round-to-nearest
    specs: dict = field(default_factory=dict)            # weight → LayerSpec
    gathers: dict = field(default_factory=dict)          # embedding table → (indices tensor, rows): lookups counted
    hessians_deferred: bool = False                      # major-axis Hessians are collected while quantizing
    float_activations: dict = field(default_factory=dict)  # planned activation → why it stays float
    act_mode: str = "static"                             # static | dynamic | none (cet_onnx.graph.act_mode)
    act_mode_why: str = "as requested"
    fixed_inputs: dict = field(default_factory=dict)     # --fix-input: name → (declaration, value)
    unexercised: dict = field(default_factory=dict)      # weight whose layer the data never runs → why

    @property
    def disjoint(self) -> bool:
        """Whether verification runs on held-out samples (not on the calibration data itself)."""
        return self.verify_samples is not self.calib_samples

    def verify_labels(self) -> np.ndarray | None:
        """The labels of the held-out verification samples (the last ones), when both exist."""
        if self.labels is None or not self.disjoint:
            return None
        return self.labels[len(self.labels) - len(self.verify_samples):]
