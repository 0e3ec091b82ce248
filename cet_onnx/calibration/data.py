"""Calibration data: load it, check it against the model's inputs, hand out batches.

Everything here runs *before* any quantization work, so that a wrong file, a
misspelled input name or a bad shape is reported at once as an
:class:`~cet_onnx.errors.InputError` with a one-line message naming the file
and the input, rather than as an onnxruntime failure half-way through.

Sources accepted by :func:`load_samples` (the ``source`` string):

* a **directory of ``.npy`` / ``.npz`` files**, read in name order.  A ``.npy``
  file holds one array for a single-input model; a ``.npz`` file holds one feed
  keyed by input name.
* a **single ``.npz`` file** keyed by input name (a single ``.npy`` file is also
  accepted for single-input models).
* a **directory of images** (``.png .jpg .jpeg .bmp``) for single-input image
  models, preprocessed according to :class:`ImageOptions` (needs Pillow).
* **``module:callable``** or **``path/to/file.py:callable``**.  This is the ONLY
  source that runs user code: the module is imported and the attribute is
  called with no arguments (or used directly if it already is a reader).  It
  may return an iterable of feed dicts or an object with ``get_next()`` like
  onnxruntime's ``CalibrationDataReader``.
* ``None``: random data shaped like the model's inputs, with a loud warning.

Array rules, common to every source:

* Axis 0 is the sample (batch) axis.  An array whose rank is one less than the
  input's rank is a single sample without the batch axis; it gets one.
* Other fixed dimensions must match the model exactly; dynamic ones are free.
* Floats of another width are cast (float64 -> float32); integers of another
  width are cast if every value fits; float vs integer vs bool is an error.
* NaN or Inf in float data is an error.
* ``.npy`` / ``.npz`` files are always loaded with ``allow_pickle=False``.

Feeds are split into samples with a leading batch axis of 1 so that ``limit``
counts samples whatever the source; :func:`batched` puts them back together.

**Runs.**  Some models' inputs cannot be split along axis 0 and stacked again: a
scalar input (a sample rate), a recurrent state whose batch axis is not axis 0
(``state [2, batch, 128]``), inputs whose first dimensions disagree.  For those
(:func:`run_reason` says why), every feed is *one run*: it is run exactly as
given, never split or stacked, each array has the input's full rank, ``limit``
counts runs and a batch is one run.  A stateful streaming model is calibrated
with a reader whose feeds carry the state the previous run returned (see the
README, "Streaming, stateful and branching models").
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx_ir as ir

from cet_onnx.errors import InputError

Dim = Union[int, str, None]
Feed = dict[str, np.ndarray]

NUMPY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DEFAULT_RANDOM_SAMPLES = 8
#: image tensor layouts (``--layout``)
LAYOUTS = ("NCHW", "NHWC")

# Exceptions numpy's loaders raise on corrupt, truncated or pickled files.
_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, TypeError)


# --------------------------------------------------------------------------- model inputs


@dataclass(frozen=True)
class ModelInput:
    """One graph input that calibration data has to provide.

    ``shape`` holds an int for each fixed dimension and the ``dim_param`` name
    (or ``None``) for each dynamic one.  ``rank_known`` is False when the model
    declares no shape at all; ``shape`` is then ``()`` and shapes go unchecked.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]
    rank_known: bool = True
    optional: bool = False      # data may leave it out (an input fixed by --fix-input)


def model_inputs(model: ir.Model) -> list[ModelInput]:
    """The model's graph inputs that are not initializers, in graph order.

    Older exporters list weights among the graph inputs too; those have an
    initializer and need no calibration data, so they are left out.
    """
    return [model_input(v) for v in model.graph.inputs if v.name not in model.graph.initializers]


def model_input(value: ir.Value) -> ModelInput:
    """Translate one graph input into a :class:`ModelInput`."""
    if value.type is not None and not isinstance(value.type, ir.TensorType):
        raise InputError(f"model input '{value.name}' is a {type(value.type).__name__}, "
                         "not a tensor; only tensor inputs are supported")
    if value.dtype is None:
        raise InputError(f"model input '{value.name}' is a value of unknown type, "
                         "not a tensor; only tensor inputs are supported")
    try:
        dtype = np.dtype(value.dtype.numpy())
    except (KeyError, ValueError, TypeError, NotImplementedError) as exc:
        raise InputError(f"model input '{value.name}' has unsupported element type {value.dtype.name}") from exc
    if value.shape is None:
        return ModelInput(value.name, dtype, (), rank_known=False)
    return ModelInput(value.name, dtype, tuple(_dim(d) for d in value.shape))


def _dim(dim: int | ir.SymbolicDim) -> Dim:
    """A fixed dimension as int, a dynamic one as its name (or None if unnamed)."""
    return int(dim) if isinstance(dim, int) else dim.value


# --------------------------------------------------------------------------- messages


def _where(origin: str) -> str:
    """Common message prefix naming where the data came from."""
    return f"calibration data '{origin}'"


def _fmt_shape(shape: Iterable[Any]) -> str:
    """``[N,1,8,8]``-style shape text; unnamed dynamic dims show as ``?``."""
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _expected_shape(inp: ModelInput, exact_batch: bool) -> str:
    """Expected shape text; axis 0 shows as ``N`` where its size is free."""
    dims = list(inp.shape)
    if dims and not exact_batch:
        dims[0] = "N"
    return _fmt_shape(dims)


def _one_line(text: str) -> str:
    """Collapse a (possibly multi-line) message from elsewhere to one line."""
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- dtypes


def _kind(dtype: np.dtype) -> str:
    """Coarse dtype family: 'float', 'int', 'bool' or 'other'.

    ml_dtypes types (bfloat16, float8, int4) have numpy kind 'V', so the name
    decides for those.
    """
    if dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name):
        return "float"
    if dtype.kind in "iu" or (dtype.kind == "V" and "int" in dtype.name):
        return "int"
    if dtype.kind == "b":
        return "bool"
    return "other"


def _cast(arr: np.ndarray, inp: ModelInput, origin: str) -> np.ndarray:
    """Convert ``arr`` to the input's dtype where that is lossless in kind.

    Float <-> float is cast silently (precision is the user's choice of file
    format, not a mistake); int <-> int only if every value survives; anything
    else (float vs int, bool, strings) is an InputError.
    """
    if arr.dtype == inp.dtype:
        return arr
    src, dst = _kind(arr.dtype), _kind(inp.dtype)
    if src == dst == "float":
        with np.errstate(over="ignore"):  # overflow becomes Inf, reported by _check_finite
            return arr.astype(inp.dtype)
    if src == dst == "int":
        low, high = _int_range(inp.dtype)
        if arr.size == 0 or (low <= int(arr.min()) and int(arr.max()) <= high):
            return arr.astype(inp.dtype)
        raise InputError(f"{_where(origin)}: input '{inp.name}' expects {inp.dtype.name}, "
                         f"got {arr.dtype.name} with values outside the {inp.dtype.name} range")
    raise InputError(f"{_where(origin)}: input '{inp.name}' expects {inp.dtype.name}, "
                     f"got {_dtype_text(arr.dtype)}")


def _int_range(dtype: np.dtype) -> tuple[int, int]:
    """(min, max) representable by an integer dtype, ml_dtypes' int4 included."""
    try:
        info = np.iinfo(dtype)
    except ValueError:
        import ml_dtypes  # installed with onnx whenever such dtypes exist

        info = ml_dtypes.iinfo(dtype)
    return int(info.min), int(info.max)


def _dtype_text(dtype: np.dtype) -> str:
    """Dtype name, flagged when it is not numeric at all."""
    return dtype.name if _kind(dtype) != "other" else f"{dtype.name} (non-numeric)"


def _check_finite(arr: np.ndarray, inp: ModelInput, origin: str) -> None:
    """Reject NaN/Inf in float data: they would poison every range statistic."""
    if _kind(arr.dtype) != "float" or arr.size == 0:
        return
    values = arr if arr.dtype.kind == "f" else arr.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise InputError(f"{_where(origin)}: input '{inp.name}' contains NaN or Inf "
                         f"({bad} of {finite.size} values)")


# --------------------------------------------------------------------------- validation


def _check_names(feed: Mapping[str, Any], inputs: list[ModelInput], origin: str) -> None:
    """Every key must be a model input and every model input must be present."""
    wanted = [inp.name for inp in inputs]
    unknown = [key for key in feed if key not in wanted]
    if unknown:
        hint = ""
        if str(unknown[0]).startswith("arr_"):
            hint = "; save arrays by name, e.g. np.savez(path, input_name=array)"
        raise InputError(f"{_where(origin)}: unknown input '{unknown[0]}' "
                         f"(model inputs: {', '.join(wanted)}){hint}")
    missing = [inp.name for inp in inputs if inp.name not in feed and not inp.optional]
    if missing:
        raise InputError(f"{_where(origin)}: missing input '{missing[0]}' "
                         f"(model inputs: {', '.join(wanted)})")


def _dims_match(got: tuple[int, ...], want: tuple[Dim, ...]) -> bool:
    """True if ranks agree and every fixed dimension of ``want`` matches."""
    return len(got) == len(want) and all(
        not isinstance(w, int) or g == w for g, w in zip(got, want))


def _shape_error(inp: ModelInput, got: tuple[int, ...], origin: str, exact_batch: bool) -> InputError:
    """The standard 'expects shape ..., got ...' error."""
    return InputError(f"{_where(origin)}: input '{inp.name}' expects shape "
                      f"{_expected_shape(inp, exact_batch)} ({inp.dtype.name}), "
                      f"got {_fmt_shape(got)}")


def _check_shape(arr: np.ndarray, inp: ModelInput, origin: str, exact_batch: bool) -> None:
    """Rank and fixed dims must match; axis 0 is checked only if ``exact_batch``."""
    if not inp.rank_known:
        if arr.ndim == 0:
            raise _shape_error(inp, arr.shape, origin, exact_batch)
        return
    want = inp.shape if exact_batch else (None,) + inp.shape[1:]
    if not _dims_match(arr.shape, want):
        raise _shape_error(inp, arr.shape, origin, exact_batch)


def _sample_count(feed: Mapping[str, np.ndarray], origin: str) -> int:
    """Common size of axis 0 across the feed's arrays (they must agree)."""
    counts = {name: arr.shape[0] for name, arr in feed.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"'{name}' has {n}" for name, n in counts.items())
        raise InputError(f"{_where(origin)}: inputs disagree on the number of samples "
                         f"along axis 0 ({detail})")
    return next(iter(counts.values()), 0)


def validate_feed(feed: dict[str, np.ndarray], inputs: list[ModelInput], origin: str,
                  *, exact_batch: bool = False) -> None:
    """Check a ready-to-run feed strictly; raise a one-line InputError if it is wrong.

    Names must match the model's inputs exactly, dtypes must be identical (no
    casting here: use :func:`conform_feed` for raw user data), ranks and fixed
    dimensions must match, float data must be finite and all arrays must
    agree on the size of axis 0.  Axis 0 is the batch axis: its size is
    checked against a fixed model dimension only when ``exact_batch`` is True
    (the right choice for a batch about to be run; samples always have 1).
    """
    _check_names(feed, inputs, origin)
    for inp in inputs:
        arr = feed[inp.name]
        if not isinstance(arr, np.ndarray):
            raise InputError(f"{_where(origin)}: input '{inp.name}' is a "
                             f"{type(arr).__name__}, not a numpy array")
        if arr.dtype != inp.dtype:
            raise InputError(f"{_where(origin)}: input '{inp.name}' expects {inp.dtype.name}, "
                             f"got {_dtype_text(arr.dtype)}")
        _check_shape(arr, inp, origin, exact_batch)
        _check_finite(arr, inp, origin)
    if run_reason(inputs) is None:
        _sample_count(feed, origin)


def _as_array(value: Any, inp: ModelInput, origin: str) -> np.ndarray:
    """``np.asarray`` that reports failures (ragged lists, objects) as InputError."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{_where(origin)}: input '{inp.name}' cannot be converted to an "
                         f"array: {_one_line(exc)}") from exc
    if arr.dtype.kind == "O":
        raise InputError(f"{_where(origin)}: input '{inp.name}' expects {inp.dtype.name}, "
                         "got object (non-numeric)")
    return arr


def _conform_array(value: Any, inp: ModelInput, origin: str) -> np.ndarray:
    """One input's raw data -> array of the right dtype with a sample axis."""
    arr = _cast(_as_array(value, inp, origin), inp, origin)
    rank = len(inp.shape)
    if inp.rank_known and rank >= 1 and arr.ndim == rank - 1:
        if not _dims_match(arr.shape, inp.shape[1:]):
            raise _shape_error(inp, arr.shape, origin, exact_batch=False)
        arr = arr[np.newaxis]
    else:
        _check_shape(arr, inp, origin, exact_batch=False)
    _check_finite(arr, inp, origin)
    return arr


def _check_mapping(feed: Any, inputs: list[ModelInput], origin: str) -> None:
    """Raw user data must be a mapping whose keys are the model's inputs (:func:`_check_names`)."""
    if not isinstance(feed, Mapping):
        raise InputError(f"{_where(origin)}: expected a dict mapping input names to arrays, "
                         f"got {type(feed).__name__}")
    _check_names(feed, inputs, origin)


def conform_feed(feed: Mapping[str, Any], inputs: list[ModelInput], origin: str) -> Feed:
    """Turn raw user data for one feed into a validated feed (axis 0 = samples).

    Applies the module's array rules (cast float widths, add a missing batch
    axis, check names/shapes/finiteness) and returns arrays in model-input
    order.  The result passes :func:`validate_feed`.
    """
    _check_mapping(feed, inputs, origin)
    out = {inp.name: _conform_array(feed[inp.name], inp, origin) for inp in inputs if inp.name in feed}
    _sample_count(out, origin)
    return out


def run_reason(inputs: list[ModelInput]) -> str | None:
    """Why feeds for ``inputs`` cannot be split into samples along axis 0 and stacked again, or None.

    Axis 0 is a common sample axis only if every input has one (no scalars) and the inputs agree on
    it: all dynamic, or all the same fixed size, no input fixes it above 1 while leaving a later axis
    dynamic (``x [seq=40, batch, 256]`` of an LSTM), and no dynamic axis-0 name (``batch``) appears at
    another axis of some input (a state ``[layers, batch, hidden]``).
    """
    ranked = [inp for inp in inputs if inp.rank_known]
    scalar = next((inp for inp in ranked if not inp.shape), None)
    if scalar is not None:
        return f"input '{scalar.name}' is a scalar"
    firsts = {inp.name: inp.shape[0] for inp in ranked}
    fixed = {name: d for name, d in firsts.items() if isinstance(d, int)}
    if fixed and len(fixed) < len(firsts):
        dyn = next(name for name in firsts if name not in fixed)
        name, d = next(iter(fixed.items()))
        return f"input '{name}' has a fixed first dimension ({d}) and input '{dyn}' a dynamic one"
    if len(set(fixed.values())) > 1:
        return "inputs have different fixed first dimensions (" + ", ".join(
            f"'{n}' {d}" for n, d in fixed.items()) + ")"
    for inp in ranked:
        first, rest = inp.shape[0], inp.shape[1:]
        dynamic = next((axis for axis, d in enumerate(rest, start=1) if not isinstance(d, int)), None)
        if isinstance(first, int) and first > 1 and dynamic is not None:
            return (f"input '{inp.name}' has a fixed first dimension ({first}) and a dynamic one at axis {dynamic}: "
                    "axis 0 is not its batch (a sequence length?)")
    batch_names = {d for d in firsts.values() if isinstance(d, str)}
    for inp in ranked:
        for axis, d in enumerate(inp.shape[1:], start=1):
            if isinstance(d, str) and d in batch_names:
                return f"the batch dimension '{d}' is axis {axis} of input '{inp.name}'"
    return None


def conform_run(feed: Mapping[str, Any], inputs: list[ModelInput], origin: str) -> Feed:
    """Raw user data for one run -> a validated feed, every array at the input's full rank (no batch axis
    added, none split off)."""
    _check_mapping(feed, inputs, origin)
    out = {}
    for inp in (inp for inp in inputs if inp.name in feed):
        arr = _cast(_as_array(feed[inp.name], inp, origin), inp, origin)
        if inp.rank_known and not _dims_match(arr.shape, inp.shape):
            raise InputError(f"{_where(origin)}: input '{inp.name}' expects shape {_fmt_shape(inp.shape)} "
                             f"({inp.dtype.name}) in each run's feed, got {_fmt_shape(arr.shape)}; feeds are runs "
                             f"here ({run_reason(inputs)}): give one .npz file per run")
        _check_finite(arr, inp, origin)
        out[inp.name] = arr
    return out


def _conform(feed: Mapping[str, Any], inputs: list[ModelInput], origin: str) -> Feed:
    """:func:`conform_run` where feeds are runs (:func:`run_reason`), else :func:`conform_feed`."""
    if run_reason(inputs) is not None:
        return conform_run(feed, inputs, origin)
    return conform_feed(feed, inputs, origin)


def _split(feed: Feed) -> Iterator[Feed]:
    """Split a feed into samples of batch size 1 (views, no copies)."""
    count = next(iter(feed.values())).shape[0] if feed else 0
    for i in range(count):
        yield {name: arr[i:i + 1] for name, arr in feed.items()}


# --------------------------------------------------------------------------- numpy files


def _load_numpy(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """Read a .npy (-> array) or .npz (-> dict) file, never unpickling anything.

    numpy's loaders raise many exception types on corrupt, truncated or
    pickled (object) files; all are reported as one InputError naming the file.
    """
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        return np.asarray(loaded)
    except _LOAD_ERRORS as exc:
        raise InputError(f"{_where(str(path))}: cannot read file: {_one_line(exc)}") from exc


def _numpy_file_feed(path: Path, inputs: list[ModelInput]) -> Feed:
    """One .npy/.npz file -> a conformed feed (axis 0 = samples)."""
    origin = str(path)
    data = _load_numpy(path)
    suffix = path.suffix.lower()
    if suffix == ".npz" and not isinstance(data, dict):
        raise InputError(f"{_where(origin)}: not an .npz archive (it holds a single array)")
    if suffix == ".npy" and isinstance(data, dict):
        raise InputError(f"{_where(origin)}: not a .npy array (it is an .npz archive)")
    if isinstance(data, dict):
        return _conform(data, inputs, origin)
    required = [inp for inp in inputs if not inp.optional]
    if len(required) != 1:
        names = ", ".join(inp.name for inp in required)
        raise InputError(f"{_where(origin)}: a .npy file only works for a single-input model "
                         f"(model inputs: {names}); use .npz files keyed by input name")
    return _conform({required[0].name: data}, inputs, origin)


def _numpy_dir_feeds(files: list[Path], inputs: list[ModelInput]) -> Iterator[Feed]:
    """Feeds of a directory of .npy/.npz files, in name order, loaded lazily."""
    for path in files:
        yield _numpy_file_feed(path, inputs)


# --------------------------------------------------------------------------- images


@dataclass
class ImageOptions:
    """How a folder of images becomes model input.

    ``size`` is (height, width); by default the model's fixed H/W.  Pixels are
    scaled to [0, 1], then ``(x - mean) / std`` per channel (one value applies
    to every channel).  ``grayscale=None`` follows the model's channel
    dimension (1 -> grayscale, otherwise RGB).
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    grayscale: bool | None = None


@dataclass(frozen=True)
class _ImagePlan:
    """Resolved image preprocessing: everything decided before reading a file."""

    height: int
    width: int
    channels: int
    mean: np.ndarray  # shape (channels,)
    std: np.ndarray
    layout: str


def _image_plan(options: ImageOptions, inp: ModelInput, source: str) -> _ImagePlan:
    """Decide size, channels and normalisation from the options and the model."""
    layout = options.layout.upper()
    if layout not in LAYOUTS:
        raise InputError(f"image layout must be NCHW or NHWC, got '{options.layout}'")
    if not inp.rank_known or len(inp.shape) != 4:
        raise InputError(f"{_where(source)}: images need a 4-D model input ({layout}), but input "
                         f"'{inp.name}' has shape {_fmt_shape(inp.shape) if inp.rank_known else 'unknown'}")
    c_dim, h_dim, w_dim = (inp.shape[1], inp.shape[2], inp.shape[3]) if layout == "NCHW" \
        else (inp.shape[3], inp.shape[1], inp.shape[2])
    grayscale = options.grayscale if options.grayscale is not None else c_dim == 1
    channels = 1 if grayscale else 3
    height, width = _image_size(options.size, h_dim, w_dim, inp, source)
    mean = _per_channel(options.mean, channels, "mean")
    std = _per_channel(options.std, channels, "std")
    if np.any(std == 0):
        raise InputError("image std must not contain 0")
    return _ImagePlan(height, width, channels, mean, std, layout)


def _image_size(size: tuple[int, int] | None, h_dim: Dim, w_dim: Dim,
                inp: ModelInput, source: str) -> tuple[int, int]:
    """Explicit size, else the model's fixed H/W, else an InputError."""
    if size is not None:
        height, width = (int(v) for v in size)
        if height < 1 or width < 1:
            raise InputError(f"image size must be positive, got {height}x{width}")
        return height, width
    if isinstance(h_dim, int) and isinstance(w_dim, int) and h_dim > 0 and w_dim > 0:
        return h_dim, w_dim
    raise InputError(f"{_where(source)}: input '{inp.name}' has a dynamic image size "
                     f"{_fmt_shape(inp.shape)}; pass --image-size H,W")


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> np.ndarray:
    """Broadcast a 1-value or per-channel tuple to ``channels`` float32 values."""
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        return np.repeat(arr, channels)
    if arr.size != channels:
        raise InputError(f"image {what} needs 1 or {channels} values, got {arr.size}")
    return arr


def _import_pillow() -> Any:
    """Pillow is optional; import it only when images are actually loaded."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise InputError("loading images needs Pillow: pip install pillow "
                         "(or pip install 'cet-onnx[images]')") from exc
    return Image


def _load_image(path: Path, plan: _ImagePlan, image_module: Any) -> np.ndarray:
    """Read, resize and normalise one image to a (1, ...) float32 sample."""
    try:
        with image_module.open(path) as img:
            img = img.convert("L" if plan.channels == 1 else "RGB")
            if img.size != (plan.width, plan.height):
                img = img.resize((plan.width, plan.height), image_module.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32)
    except (OSError, ValueError, SyntaxError, image_module.DecompressionBombError) as exc:
        raise InputError(f"{_where(str(path))}: cannot read image: {_one_line(exc)}") from exc
    hwc = pixels.reshape(plan.height, plan.width, plan.channels) / 255.0
    hwc = (hwc - plan.mean) / plan.std
    chw_or_hwc = hwc.transpose(2, 0, 1) if plan.layout == "NCHW" else hwc
    return np.ascontiguousarray(chw_or_hwc[np.newaxis], dtype=np.float32)


def _image_feeds(files: list[Path], inputs: list[ModelInput], options: ImageOptions | None,
                 source: str) -> Iterator[Feed]:
    """Feeds of a folder of images (single-input models only), in name order."""
    required = [inp for inp in inputs if not inp.optional]
    if len(required) != 1:
        names = ", ".join(inp.name for inp in required)
        raise InputError(f"{_where(source)}: image folders only work for single-input models "
                         f"(model inputs: {names})")
    inp = required[0]
    plan = _image_plan(options or ImageOptions(), inp, source)
    image_module = _import_pillow()
    for path in files:
        yield conform_feed({inp.name: _load_image(path, plan, image_module)}, inputs, str(path))


# --------------------------------------------------------------------------- user code


def _parse_callable_spec(spec: str) -> tuple[str, str]:
    """Split ``module:attr`` / ``file.py:attr`` at the last colon."""
    module, _, attr = spec.rpartition(":")
    if not module or not attr:
        raise InputError(f"calibration data '{spec}': expected module:callable")
    return module, attr


def _import_module(module: str, spec: str) -> Any:
    """Import a dotted module (also from the cwd) or a ``.py`` file path."""
    is_path = module.endswith(".py") or "/" in module or os.sep in module
    try:
        if is_path:
            return _import_file(Path(module), spec)
        sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(module)
        finally:
            sys.path.remove(os.getcwd())
    except InputError:
        raise
    except BaseException as exc:  # user code: report anything, even SystemExit, as input
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise InputError(f"calibration data '{spec}': cannot import module '{module}': "
                         f"{type(exc).__name__}: {_one_line(exc)}") from exc


def _import_file(path: Path, spec: str) -> Any:
    """Import a Python file by path under a private module name."""
    if not path.is_file():
        raise InputError(f"calibration data '{spec}': no such file '{path}'")
    name = f"_cet_onnx_calib_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"calibration data '{spec}': cannot import '{path}'")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # so dataclasses/pickling inside the file work
    module_spec.loader.exec_module(module)
    return module


def _resolve_attr(module_obj: Any, module: str, attr: str, spec: str) -> Any:
    """``getattr`` along a dotted path, reported as InputError if missing."""
    obj = module_obj
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"calibration data '{spec}': module '{module}' has no attribute "
                             f"'{attr}'")
        obj = getattr(obj, part)
    return obj


def _call_user(fn: Any, spec: str, what: str) -> Any:
    """Call user code, turning its exceptions into a one-line InputError."""
    try:
        return fn()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise InputError(f"calibration data '{spec}': {what} raised "
                         f"{type(exc).__name__}: {_one_line(exc)}") from exc


def _reader_items(obj: Any, spec: str) -> Iterator[Any]:
    """Items of a reader (``get_next()`` until None) or of any iterable."""
    if hasattr(obj, "get_next") and not inspect.isclass(obj):
        while True:
            item = _call_user(obj.get_next, spec, "get_next()")
            if item is None:
                return
            yield item
    elif isinstance(obj, Mapping):
        yield obj  # a single feed dict
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        iterator = _call_user(lambda: iter(obj), spec, "iterating it")
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                raise InputError(f"calibration data '{spec}': iterating it raised "
                                 f"{type(exc).__name__}: {_one_line(exc)}") from exc
            yield item
    else:
        raise InputError(f"calibration data '{spec}': returned {type(obj).__name__}; expected "
                         "an iterable of dicts or an object with get_next()")


def _callable_feeds(spec: str, inputs: list[ModelInput]) -> Iterator[Feed]:
    """Feeds produced by user code named ``module:callable`` (runs that code)."""
    module, attr = _parse_callable_spec(spec)
    obj = _resolve_attr(_import_module(module, spec), module, attr, spec)
    is_reader_instance = hasattr(obj, "get_next") and not inspect.isclass(obj)
    if not is_reader_instance and callable(obj):
        obj = _call_user(obj, spec, "calling it")
    for index, item in enumerate(_reader_items(obj, spec)):
        yield _conform(item, inputs, f"{spec} item {index}")


# --------------------------------------------------------------------------- random data


def _random_array(inp: ModelInput, rng: np.random.Generator, runs: bool = False) -> np.ndarray:
    """One random sample (batch axis 1; with ``runs`` one run, dynamic dims 1) for an input: N(0,1),
    ints in [0,10), bools."""
    if not inp.rank_known:
        raise InputError(f"random calibration data: input '{inp.name}' declares no shape; "
                         "provide calibration data")
    shape = tuple(d if isinstance(d, int) else 1 for d in inp.shape)
    if not runs:
        shape = (1,) + shape[1:]
    kind = _kind(inp.dtype)
    if kind == "float":
        return rng.standard_normal(shape, dtype=np.float32).astype(inp.dtype)
    if kind == "int":
        return rng.integers(0, 10, size=shape).astype(inp.dtype)
    if kind == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise InputError(f"random calibration data: cannot make {inp.dtype.name} values for input "
                     f"'{inp.name}'; provide calibration data")


def _random_samples(inputs: list[ModelInput], count: int, seed: int) -> list[Feed]:
    """``count`` random samples; warns loudly on stderr, including about guessed dims."""
    runs = run_reason(inputs) is not None
    rng = np.random.default_rng(seed)
    samples = [{inp.name: _random_array(inp, rng, runs) for inp in inputs} for _ in range(count)]
    sys.stderr.write(
        f"WARNING: no calibration data given: using {count} samples of RANDOM data "
        f"(seed {seed}). Quantization ranges from random data are NOT meaningful; "
        "accuracy of the result says nothing. Provide real calibration data.\n")
    guessed = [f"{inp.name}{_fmt_shape(inp.shape)}" for inp in inputs
               if any(not isinstance(d, int) for d in (inp.shape if runs else inp.shape[1:]))]
    if guessed:
        sys.stderr.write(f"WARNING: dynamic non-batch dimensions set to 1 for random data: "
                         f"{', '.join(guessed)}\n")
    return samples


# --------------------------------------------------------------------------- entry points


def _dir_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(numpy files, image files) directly in ``directory``, sorted by name."""
    entries = sorted((p for p in directory.iterdir()
                      if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)
    numpy_files = [p for p in entries if p.suffix.lower() in NUMPY_SUFFIXES]
    image_files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    return numpy_files, image_files


def _source_feeds(source: str, inputs: list[ModelInput],
                  image: ImageOptions | None) -> Iterator[Feed]:
    """Dispatch a source string to the right loader; yields conformed feeds lazily."""
    path = Path(source)
    if path.is_dir():
        numpy_files, image_files = _dir_files(path)
        if numpy_files and image_files:
            raise InputError(f"{_where(source)}: directory mixes .npy/.npz files and images; "
                             "use one kind")
        if numpy_files:
            return _numpy_dir_feeds(numpy_files, inputs)
        if image_files:
            return _image_feeds(image_files, inputs, image, source)
        raise InputError(f"{_where(source)}: directory has no .npy, .npz or image "
                         f"({' '.join(IMAGE_SUFFIXES)}) files")
    if path.is_file():
        if path.suffix.lower() in NUMPY_SUFFIXES:
            return iter([_numpy_file_feed(path, inputs)])
        raise InputError(f"{_where(source)}: unsupported file type; expected a .npz/.npy file, "
                         "a directory, or module:callable")
    if ":" in source and not path.exists():
        module, _attr = _parse_callable_spec(source)
        if module.endswith(".py") or "/" in module or os.sep in module or _is_dotted_name(module):
            return _callable_feeds(source, inputs)
    raise InputError(f"{_where(source)}: no such file or directory")


def _is_dotted_name(text: str) -> bool:
    """True for ``pkg.mod`` style module names."""
    return all(part.isidentifier() for part in text.split("."))


def load_samples(source: str | None, inputs: list[ModelInput], *, limit: int | None = None,
                 image: ImageOptions | None = None, seed: int = 0,
                 fixed: Mapping[str, tuple[ModelInput, np.ndarray]] | None = None) -> list[Feed]:
    """Load, validate and split calibration data into samples of batch size 1.

    ``source`` is a directory, a ``.npz``/``.npy`` file, ``module:callable``
    (the only source that runs user code) or None for random data (``limit``
    samples, default 8, from ``seed``, with a warning on stderr).  Each sample
    maps every model input to an array of the input's dtype with a leading
    axis of size 1.  ``limit`` keeps the first N samples (sources are read
    lazily, so later files are not even opened).  Raises InputError for
    anything wrong, including an empty source.  Where feeds are runs (:func:`run_reason`) each feed is
    one sample, as given.  ``fixed`` (``--fix-input``: name → (declaration, value)): those inputs may be in
    the data (they are dropped), but only with their fixed value.
    """
    if limit is not None and limit < 1:
        raise InputError(f"calibration sample limit must be at least 1, got {limit}")
    if source is None:
        return _random_samples(inputs, limit or DEFAULT_RANDOM_SAMPLES, seed)
    samples: list[Feed] = []
    declared = inputs + [dataclasses.replace(inp, optional=True) for inp, _ in (fixed or {}).values()]
    runs = run_reason(declared) is not None
    for index, feed in enumerate(_source_feeds(source, declared, image)):
        feed = _without_fixed(feed, fixed or {}, f"{source} feed {index}")
        for sample in ([feed] if runs else _split(feed)):
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                return samples
    if not samples:
        raise InputError(f"{_where(source)}: no samples found")
    return samples


def _without_fixed(feed: Feed, fixed: Mapping[str, tuple[ModelInput, np.ndarray]], origin: str) -> Feed:
    """``feed`` without the fixed inputs, which must hold the fixed value where the data gives them."""
    for name, (_inp, value) in fixed.items():
        if name in feed and not _holds(feed[name], value):
            raise InputError(f"{_where(origin)}: input '{name}' is fixed to {value.tolist()} by --fix-input, "
                             f"but the data gives {np.unique(feed[name]).tolist()[:4]}")
    return {k: v for k, v in feed.items() if k not in fixed}


def _holds(given: np.ndarray, value: np.ndarray) -> bool:
    """Whether every sample in ``given`` equals ``value`` (broadcast over a batch axis)."""
    try:
        return bool(np.all(np.broadcast_to(given, np.broadcast_shapes(given.shape, value.shape)) == value))
    except ValueError:
        return False


def batched(samples: list[Feed], batch_size: int, *,
            inputs: list[ModelInput] | None = None) -> list[Feed]:
    """Concatenate consecutive samples along axis 0 into batches of ``batch_size``.

    The last batch may be smaller.  With ``inputs`` given, each batch is also
    checked with ``validate_feed(exact_batch=True)``: if an input's batch
    dimension is a fixed int, ``batch_size`` must equal it (a fixed batch of 1
    means batch_size=1) and a final partial batch is dropped.  Where feeds are runs
    (:func:`run_reason`) every run is a batch of its own, whatever ``batch_size``.  Samples whose
    dynamic dims differ cannot share a batch: that is an InputError asking for
    batch size 1.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if inputs is not None and run_reason(inputs) is not None:
        for index, run in enumerate(samples):
            validate_feed(run, inputs, f"run {index}", exact_batch=True)
        return [dict(run) for run in samples]
    fixed = fixed_batch(inputs or [])
    if fixed is not None and fixed != batch_size:
        raise InputError(f"the model's batch dimension is fixed at {fixed}; "
                         f"use batch size {fixed}, not {batch_size}")
    batches = [_concat(samples[i:i + batch_size], i)
               for i in range(0, len(samples), batch_size)]
    if fixed is not None and batches and len(samples) % batch_size:
        batches.pop()  # a fixed-batch model cannot run a partial batch
        if not batches:
            raise InputError(f"the model's batch dimension is fixed at {fixed} but only "
                             f"{len(samples)} calibration samples were given")
    if inputs is not None:
        for index, batch in enumerate(batches):
            validate_feed(batch, inputs, f"batch {index}", exact_batch=True)
    return batches


def samples_split(inputs: list[ModelInput]) -> bool:
    """Whether a batch for ``inputs`` may run in pieces of fewer samples: every input has a free sample axis 0."""
    try:
        return run_reason(inputs) is None and fixed_batch(inputs) is None
    except InputError:
        return False


def fixed_batch(inputs: list[ModelInput]) -> int | None:
    """The fixed size of axis 0 shared by the inputs, or None if it is dynamic."""
    sizes = {inp.shape[0] for inp in inputs
             if inp.rank_known and inp.shape and isinstance(inp.shape[0], int)}
    if len(sizes) > 1:
        raise InputError(f"model inputs have different fixed batch sizes: {sorted(sizes)}")
    return sizes.pop() if sizes else None


def _concat(chunk: list[Feed], start: int) -> Feed:
    """Concatenate one chunk of samples input by input."""
    if len(chunk) == 1:
        return dict(chunk[0])
    out: Feed = {}
    for name in chunk[0]:
        shapes = {arr.shape[1:] for arr in (s[name] for s in chunk)}
        if len(shapes) > 1:
            raise InputError(f"calibration samples {start}..{start + len(chunk) - 1} have "
                             f"different shapes for input '{name}' "
                             f"({', '.join(_fmt_shape(s) for s in sorted(shapes))}); "
                             "use batch size 1")
        out[name] = np.concatenate([s[name] for s in chunk], axis=0)
    return out
