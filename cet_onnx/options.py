"""Every knob of ``cet-onnx quantize`` / ``analyze``, grouped by the stage that reads it and checked once.

:class:`QuantizeOptions` composes one small frozen dataclass per concern (data, weights,
activations, rounding, allocation, run). :func:`validate` checks every choice and combination
before any work starts, so a bad option never costs a calibration pass.

Scripts may keep using the flat names of earlier versions: ``QuantizeOptions(device="cpu",
avg_bits=3)``, ``QuantizeOptions.of(...)``, ``opts.replace(allocator="hawq")`` (and
``dataclasses.replace``) all accept them, and ``opts.avg_bits`` reads one. :meth:`QuantizeOptions.flat`
is that flat view, in the field order of earlier versions (the report's ``options`` object).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

from cet_onnx.allocation.allocate import ALLOCATORS, Budget
from cet_onnx.allocation.losses import LOSSES
from cet_onnx.allocation.parallel import require_ray
from cet_onnx.allocation.stage import PROBE_MODES, PROBE_NUMERICS
from cet_onnx.calibration.data import ImageOptions
from cet_onnx.calibration.ranges import METHODS
from cet_onnx.errors import InputError
from cet_onnx.graph.act_mode import ACT_MODES, ACT_PRECISIONS
from cet_onnx.quant.quantizer import ACTIVATION_BITS, CLIP_MODES, GRIDS
from cet_onnx.rounding.plan import ROUNDING_METHODS
from cet_onnx.runner import DEVICES


@dataclass(frozen=True)
class DataOptions:
    """Which samples are read and how they are split and batched."""

    batch_size: int = 16
    calib_size: int | None = None
    verify_size: int = 64
    image: ImageOptions | None = None
    labels: str | None = None


@dataclass(frozen=True)
class WeightOptions:
    """The uniform weight format (without a budget) and how every weight is clipped and gridded."""

    bits: int = 8
    per_tensor: bool = False
    block_size: int | None = None
    clip: str = "auto"
    grid: str = "auto"
    int8_full_range: bool = False   # ±127 codes in u8 × s8 integer kernels (cet_onnx.graph.integer_kernels)


@dataclass(frozen=True)
class ActivationOptions:
    """Activation quantization and how its ranges are calibrated."""

    bits: int = 8
    weight_only: bool = False       # the spelling of mode "none" of earlier versions
    symmetric: bool = False
    method: str = "mse"
    percentile: float = 99.999
    mode: str = "auto"              # auto | static | dynamic | none (see cet_onnx.graph.act_mode)
    precision: str = "auto"         # auto | uniform | solve: per-tensor precision (cet_onnx.allocation.activation_plan)
    min_agreement: float = 0.98     # the activation plan's target on the probe samples, per output kind
    min_cosine: float = 0.99
    min_sqnr_db: float = 20.0

    @property
    def requested_mode(self) -> str:
        """``mode``, with ``weight_only`` meaning ``none``."""
        return "none" if self.weight_only else self.mode


@dataclass(frozen=True)
class RoundingOptions:
    """Weight rounding: auto | rtn | major-axis (auto: major-axis when --calib is given)."""

    method: str = "auto"
    sequential: bool = False
    hessian_rows: int = 8192


@dataclass(frozen=True)
class AllocationOptions:
    """Mixed precision (used when a budget is set) and the sensitivity probes."""

    allocator: str = "cet"
    avg_bits: float | None = None
    max_size_mb: float | None = None
    max_loss: float | None = None
    bits: tuple[int, ...] = (2, 4, 8)
    candidate_block: tuple[int, ...] | int | None = (32, 128)   # block sizes of the block-wise candidates
    loss: str | None = None
    loss_output: str | None = None
    probe_size: int = 128
    hutchinson_samples: int = 4
    fidelity_samples: int = 12
    pareto_points: int = 12
    cache_dir: str | None = None
    use_cache: bool = True
    refine_rounds: int = 3
    probe_numerics: str = "float"   # float | deployed: activations in the probes (see README "Probe numerics")
    probes: str = "fast"            # fast | full: how the CET costs are measured (see README "Mixed precision")
    workers: int | None = None      # probe processes (None: 1, or with --ray the cluster's CPU count)
    ray: str | None = None          # auto | a Ray cluster address: probes in Ray actors
    max_latency_ms: float | None = None     # latency budget at --latency-batch (with a size or loss budget)
    max_latency_ratio: float | None = None  # the same, relative to the float model's measured latency

    @property
    def budget(self) -> Budget | None:
        """The budget, or None for a uniform run (:func:`validate` ensures at most one is set)."""
        if self.avg_bits is None and self.max_size_mb is None and self.max_loss is None:
            return None
        return Budget(self.avg_bits, None if self.max_size_mb is None else self.max_size_mb * 1e6, self.max_loss)


@dataclass(frozen=True)
class RunOptions:
    """How the run itself behaves: device, model simplification, seed, report reproducibility."""

    device: str = "auto"
    simplify: bool = True
    seed: int = 0
    reproducible: bool = False      # leave wall-clock fields out of the report (byte-identical reruns)
    latency_batch: int = 1          # samples per run when timing float vs quantized (0: not timed)
    latency_threads: int = 0        # onnxruntime intra-op threads when timing (0: onnxruntime's default)
    emit_contrib: int | None = None  # write com.microsoft.MatMulNBits with this accuracy_level (None: plain ONNX)
    widen_low_bit: bool = True       # per-channel INT4 / INT2 weights widened to INT8 at load (onnxruntime >= 1.23)
    fix_inputs: tuple[tuple[str, str], ...] = ()  # --fix-input NAME=VALUE: (name, value text) pairs
    keep_fixed_inputs: bool = False  # the emitted model still declares the fixed inputs (their value is ignored)


GROUPS = {"data": DataOptions, "weights": WeightOptions, "activations": ActivationOptions,
          "weight_rounding": RoundingOptions, "allocation": AllocationOptions, "run": RunOptions}

#: flat name → (group, field), in the field order of the flat options of earlier versions
FLAT: dict[str, tuple[str, str]] = {
    "weight_bits": ("weights", "bits"), "per_tensor": ("weights", "per_tensor"),
    "block_size": ("weights", "block_size"), "act_bits": ("activations", "bits"),
    "weight_only": ("activations", "weight_only"), "act_symmetric": ("activations", "symmetric"),
    "calib_method": ("activations", "method"), "percentile": ("activations", "percentile"),
    "simplify": ("run", "simplify"), "device": ("run", "device"), "batch_size": ("data", "batch_size"),
    "calib_size": ("data", "calib_size"), "verify_size": ("data", "verify_size"), "seed": ("run", "seed"),
    "image": ("data", "image"), "weight_clip": ("weights", "clip"), "weight_grid": ("weights", "grid"),
    "rounding": ("weight_rounding", "method"), "sequential": ("weight_rounding", "sequential"),
    "hessian_rows": ("weight_rounding", "hessian_rows"),
    **{name: ("allocation", name) for name in ("allocator", "avg_bits", "max_size_mb", "max_loss", "bits",
                                               "candidate_block", "loss", "loss_output")},
    "labels": ("data", "labels"),
    **{name: ("allocation", name) for name in ("probe_size", "hutchinson_samples", "fidelity_samples",
                                               "pareto_points", "cache_dir", "use_cache", "refine_rounds",
                                               "probe_numerics", "workers", "ray")},
    "reproducible": ("run", "reproducible"),
    "probes": ("allocation", "probes"),   # newer options follow the earlier order
    "act_mode": ("activations", "mode"),
    "int8_full_range": ("weights", "int8_full_range"),
    "act_precision": ("activations", "precision"),
}


@dataclass(init=False)
class QuantizeOptions:
    """Every option, one group per stage; built from groups, flat names of earlier versions, or both."""

    data: DataOptions = field(default_factory=DataOptions)
    weights: WeightOptions = field(default_factory=WeightOptions)
    activations: ActivationOptions = field(default_factory=ActivationOptions)
    weight_rounding: RoundingOptions = field(default_factory=RoundingOptions)
    allocation: AllocationOptions = field(default_factory=AllocationOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __init__(self, data: DataOptions | None = None, weights: WeightOptions | None = None,
                 activations: ActivationOptions | None = None, weight_rounding: RoundingOptions | None = None,
                 allocation: AllocationOptions | None = None, run: RunOptions | None = None, **flat: Any) -> None:
        given = dict(data=data, weights=weights, activations=activations, weight_rounding=weight_rounding,
                     allocation=allocation, run=run)
        unknown = sorted(set(flat) - set(FLAT))
        if unknown:
            raise TypeError(f"QuantizeOptions got unknown option(s): {', '.join(unknown)}")
        for group, cls in GROUPS.items():
            changes = {attr: flat[name] for name, (g, attr) in FLAT.items() if g == group and name in flat}
            setattr(self, group, dataclasses.replace(given[group] or cls(), **changes))

    @classmethod
    def of(cls, **flat: Any) -> QuantizeOptions:
        """Options from the flat names of earlier versions (``QuantizeOptions.of(device="cpu", avg_bits=3)``)."""
        return cls(**flat)

    def replace(self, **changes: Any) -> QuantizeOptions:
        """A copy with some options changed; takes flat names and whole groups."""
        return dataclasses.replace(self, **changes)

    def flat(self) -> dict[str, Any]:
        """Every option under its flat name, in the order of earlier versions."""
        return {name: getattr(getattr(self, group), attr) for name, (group, attr) in FLAT.items()}

    def __getattr__(self, name: str) -> Any:
        """Read access under the flat names of earlier versions (``opts.avg_bits``)."""
        group, attr = FLAT.get(name, (None, None))
        if group is None or group not in self.__dict__:
            raise AttributeError(f"'QuantizeOptions' object has no attribute '{name}'")
        return getattr(self.__dict__[group], attr)

    @property
    def budget(self) -> Budget | None:
        """The mixed-precision budget, or None for a uniform run."""
        return self.allocation.budget


def _choice(flag: str, value: Any, choices: Iterable[Any], listed: bool = True) -> None:
    """InputError unless ``value`` is one of ``choices`` ("one of a, b, c" or, with ``listed=False``, "a, b or c")."""
    choices = tuple(choices)
    if value in choices:
        return
    names = [str(c) for c in choices]
    words = f"one of {', '.join(names)}" if listed else f"{', '.join(names[:-1])} or {names[-1]}"
    raise InputError(f"{flag} must be {words}, got '{value}'")


def validate(opts: QuantizeOptions) -> None:
    """Check every option and combination of options; raises InputError before any work is done."""
    a = opts.allocation
    if sum(v is not None for v in (a.avg_bits, a.max_size_mb, a.max_loss)) > 1:
        raise InputError("give only one of --avg-bits, --max-size and --max-loss")
    _choice("--device", opts.run.device, DEVICES, listed=False)
    if a.loss is not None:
        _choice("--loss", a.loss, LOSSES)
    if a.loss == "ce" and not opts.data.labels:
        raise InputError("--loss ce needs --labels")
    _choice("--allocator", a.allocator, ALLOCATORS)
    _choice("--rounding", opts.weight_rounding.method, ROUNDING_METHODS, listed=False)
    _choice("--probe-numerics", a.probe_numerics, PROBE_NUMERICS, listed=False)
    _choice("--probes", a.probes, PROBE_MODES, listed=False)
    if a.workers is not None and (isinstance(a.workers, bool) or not isinstance(a.workers, int) or a.workers < 1):
        raise InputError(f"--workers must be a whole number of at least 1, got '{a.workers}'")
    if a.ray is not None:
        if not isinstance(a.ray, str) or not a.ray.strip():
            raise InputError(f"--ray must be auto or a Ray cluster address, got '{a.ray}'")
        require_ray()
    _choice("--calib-method", opts.activations.method, METHODS)
    if opts.run.keep_fixed_inputs and not opts.run.fix_inputs:
        raise InputError("--keep-fixed-inputs keeps the inputs --fix-input froze; give --fix-input too")
    names = [name for name, _ in opts.run.fix_inputs]
    if len(set(names)) < len(names):
        raise InputError(f"--fix-input: input '{next(n for n in names if names.count(n) > 1)}' is fixed twice")
    _choice("--act-bits", opts.activations.bits, ACTIVATION_BITS)
    _choice("--act-mode", opts.activations.mode, ACT_MODES)
    _choice("--act-precision", opts.activations.precision, ACT_PRECISIONS)
    if opts.activations.weight_only and opts.activations.mode not in ("auto", "none"):
        raise InputError(f"--weight-only is --act-mode none; it cannot be combined with "
                         f"--act-mode {opts.activations.mode}")
    if a.max_latency_ms is not None and a.max_latency_ratio is not None:
        raise InputError("give only one of --max-latency and --max-latency-ratio")
    if a.max_latency_ms is not None or a.max_latency_ratio is not None:
        flag = "--max-latency" if a.max_latency_ms is not None else "--max-latency-ratio"
        if a.budget is None:
            raise InputError(f"{flag} is a constraint next to a size or loss budget: give --avg-bits, --max-size "
                             f"or --max-loss too")
        if a.allocator == "uniform":
            raise InputError(f"{flag} needs a probed allocator (cet, hawq or sqnr), not uniform")
        if not opts.run.latency_batch:
            raise InputError(f"{flag} times the model at --latency-batch samples; it cannot be 0")
    level = opts.run.emit_contrib
    if level is not None and (isinstance(level, bool) or level not in ACCURACY_LEVELS):
        raise InputError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, got '{level}'")
    for flag, v in (("--latency-batch", opts.run.latency_batch), ("--latency-threads", opts.run.latency_threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"{flag} must be a whole number of at least 0, got '{v}'")
    _choice("--weight-clip", opts.weights.clip, CLIP_MODES)
    _choice("--weight-grid", opts.weights.grid, GRIDS)
    if opts.weights.per_tensor and opts.weights.block_size:
        raise InputError("--per-tensor and --block-size cannot be combined")


#: block sizes of the block-wise candidates without ``--candidate-block`` / ``--block-size``: 32 is the
#: finest that pays on CNNs; 128 costs 0.28 bits/weight of scales against 1.1 at 32, and on
#: all-MiniLM-L6-v2 at ``--avg-bits 4`` raised the cosine to FP32 from 0.880 (32 only) to 0.956
DEFAULT_CANDIDATE_BLOCKS = (32, 128)

#: ``accuracy_level`` of ``com.microsoft.MatMulNBits``: the smallest type its input may be computed in
#: (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8). 4 is what onnxruntime 1.32's own load-time fusion writes
#: (read from its optimised graph), so ``--emit-contrib`` defaults to it and runs the same kernel.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4


def candidate_block(requested: tuple[int, ...] | int | None, block_size: int | None) -> tuple[int, ...]:
    """Block sizes of the block-wise candidates: ``--candidate-block``, else ``--block-size``, else
    :data:`DEFAULT_CANDIDATE_BLOCKS`; 0: none (per-channel candidates only)."""
    if requested is None:
        return (block_size,) if block_size else DEFAULT_CANDIDATE_BLOCKS
    blocks = (requested,) if isinstance(requested, int) else tuple(requested)
    return tuple(sorted({b for b in blocks if b}))
