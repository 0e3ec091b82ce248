"""The ``cet-onnx`` command line (click).

Exit codes: 0 success, 1 runtime failure (including a failed verification gate),
2 usage or input error. ``--json`` prints exactly one JSON object on stdout, errors included;
human-readable text and progress go to stderr / stdout as usual otherwise.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import CetError, InputError

EXAMPLE_MODEL = "models/digits/model.onnx"


def _sanitize(o: Any) -> Any:
    """Make a report strictly JSON: non-finite floats become strings."""
    if isinstance(o, float) and not math.isfinite(o):
        return "inf" if o > 0 else "-inf" if o < 0 else "nan"
    if isinstance(o, dict):
        return {k: _sanitize(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v) for v in o]
    return o


def emit_json(obj: dict) -> None:
    click.echo(json.dumps(_sanitize(obj), indent=2, default=str))


def _on_signal(signum, frame):
    raise KeyboardInterrupt


def handle_errors(fn: Callable) -> Callable:
    """Turn CetError into a one-line message and its exit code; Ctrl-C / SIGTERM into 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = kwargs.get("as_json", False)
        signal.signal(signal.SIGTERM, _on_signal)
        try:
            return fn(*args, **kwargs)
        except CetError as exc:
            msg = str(exc).replace("\n", " ")
            if as_json:
                emit_json({"ok": False, "error": msg, "exit_code": exc.exit_code})
            click.echo(f"error: {msg}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; no output was written", err=True)
            sys.exit(130)
    return wrapper


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{option}: expected comma-separated numbers, got '{text}'") from None


def _image_options(image_size, mean, std, layout):
    from .calib_data import ImageOptions
    size = None
    if image_size is not None:
        parts = _floats(image_size.replace("x", ","), "--image-size")
        if len(parts) == 1:
            parts = (parts[0], parts[0])
        if len(parts) != 2 or min(parts) < 1:
            raise InputError(f"--image-size: expected H,W or a single size, got '{image_size}'")
        size = (int(parts[0]), int(parts[1]))
    return ImageOptions(size=size, mean=_floats(mean, "--mean") or (0.0,), std=_floats(std, "--std") or (1.0,),
                        layout=layout)


def calib_options(fn: Callable) -> Callable:
    """Options shared by every command that reads calibration / evaluation data."""
    options = [
        click.option("--calib", "calib", metavar="SOURCE",
                     help="Calibration data: a folder of .npy/.npz files, one .npz keyed by input name, "
                          "a folder of images, or module:callable returning feeds / a CalibrationDataReader "
                          "(the only option that runs your code). Without it: random data, not meaningful."),
        click.option("--calib-size", type=click.IntRange(min=1), default=None, help="Use at most N samples."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Samples per onnxruntime run (a fixed batch dimension in the model wins)."),
        click.option("--image-size", default=None, metavar="H,W", help="Resize images to H,W (image folders)."),
        click.option("--mean", default=None, metavar="M[,M,M]", help="Per-channel mean after scaling pixels to [0,1]."),
        click.option("--std", default=None, metavar="S[,S,S]", help="Per-channel std after scaling pixels to [0,1]."),
        click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True,
                     help="Image tensor layout."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="onnxruntime execution provider (auto: CUDA when available)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


json_option = click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON result on stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cet-onnx")
def main() -> None:
    """cet-onnx: post-training quantization of ONNX models with per-weight bit-widths.

    \b
    Example:
      cet-onnx quantize models/digits/model.onnx -o digits.int8.onnx --calib models/digits/calib.npz
    """


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the quantized model.")
@calib_options
@click.option("--weight-bits", type=click.IntRange(2, 8), default=8, show_default=True,
              help="Bits per weight (stored as INT8, INT4 or INT2).")
@click.option("--act-bits", type=click.Choice(["8", "16"]), default="8", show_default=True, help="Bits per activation.")
@click.option("--weight-only", is_flag=True, help="Leave activations in float (no activation Q/DQ).")
@click.option("--act-symmetric", is_flag=True, help="Signed symmetric activations instead of unsigned asymmetric.")
@click.option("--per-tensor", is_flag=True, help="One scale per weight instead of one per output channel.")
@click.option("--block-size", type=click.IntRange(min=2), default=None,
              help="Block-wise scales: one per output channel and N input channels (opset 21). "
                   "Weights with fewer than N input channels stay per-channel.")
@click.option("--calib-method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax",
              show_default=True, help="How activation ranges are chosen.")
@click.option("--percentile", type=click.FloatRange(50, 100), default=99.999, show_default=True,
              help="Percentile for --calib-method percentile.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim simplification.")
@click.option("--verify-size", type=click.IntRange(min=0), default=64, show_default=True,
              help="Held-out samples (taken from the end of the data, never used to calibrate) to verify on.")
@click.option("--verify-min-sqnr", type=float, default=None, metavar="DB",
              help="Exit 1 (and write nothing) if any output's SQNR is below DB.")
@click.option("--verify-min-agreement", type=click.FloatRange(0, 1), default=None, metavar="FRACTION",
              help="Exit 1 (and write nothing) if top-1 agreement with the float model is below FRACTION.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random calibration data.")
@json_option
@quiet_option
@handle_errors
def quantize(model, output, calib, calib_size, batch_size, image_size, mean, std, layout, device, weight_bits,
             act_bits, weight_only, act_symmetric, per_tensor, block_size, calib_method, percentile, no_simplify,
             verify_size, verify_min_sqnr, verify_min_agreement, seed, as_json, quiet):
    """Quantize MODEL and write the result to -o OUTPUT (plus OUTPUT's .report.json).

    \b
    Example:
      cet-onnx quantize models/digits/model.onnx -o digits.w4.onnx \\
          --calib models/digits/calib.npz --weight-bits 4 --block-size 32
    """
    from .pipeline import QuantizeOptions, quantize as run_quantize, report_path
    from .progress import set_quiet
    set_quiet(quiet or as_json)
    if per_tensor and block_size:
        raise InputError("--per-tensor and --block-size cannot be combined")
    opts = QuantizeOptions(
        weight_bits=weight_bits, per_tensor=per_tensor, block_size=block_size, act_bits=int(act_bits),
        weight_only=weight_only, act_symmetric=act_symmetric, calib_method=calib_method, percentile=percentile,
        simplify=not no_simplify, device=device, batch_size=batch_size, calib_size=calib_size,
        verify_size=verify_size, seed=seed, image=_image_options(image_size, mean, std, layout))
    report = run_quantize(model, output, calib, opts, verify_min_sqnr, verify_min_agreement)
    if as_json:
        emit_json({"ok": True, **report})
        return
    _print_quantize_summary(report, report_path(output))


def _fmt_sqnr(v) -> str:
    return "inf" if v == float("inf") else f"{v:.2f} dB"


def _print_quantize_summary(report: dict, report_file: Path) -> None:
    t = report["totals"]
    v = report["verification"]
    click.echo(f"wrote {report['output']} (opset {report['opset']}) and {report_file}")
    click.echo(f"weights: {len(report['weights'])} tensors, {t['weight_params']:,} parameters, "
               f"{t['weight_bytes_fp32']:,} B -> {t['weight_bytes']:,} B "
               f"({t['weight_compression']:.2f}x, {t['avg_bits']:.2f} bits/weight incl. scales)")
    click.echo(f"files: {t['file_bytes_fp32']:,} B -> {t['file_bytes']:,} B")
    if v["samples"]:
        click.echo(f"verified on {v['samples']} held-out samples:")
        for o in v["outputs"]:
            agree = f", top-1 agreement {100 * o['top1_agreement']:.2f} %" if o["top1_agreement"] is not None else ""
            click.echo(f"  {o['name']}: SQNR {_fmt_sqnr(o['sqnr_db'])}, max |err| {o['max_abs_error']:.4g}{agree}")
    click.echo("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings_s"].items()))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@json_option
@handle_errors
def inspect(model, as_json):
    """Show MODEL's inputs, outputs, opset and quantizable weights.

    \b
    Example:
      cet-onnx inspect models/digits/model.onnx
    """
    from .inspect_model import inspect_model
    info = inspect_model(model)
    if as_json:
        emit_json({"ok": True, **info})
        return
    click.echo(f"{info['model']}: opset {info['opset']}, IR {info['ir_version']}, {info['nodes']} nodes")
    for kind in ("inputs", "outputs"):
        for io in info[kind]:
            click.echo(f"  {kind[:-1]:6s} {io['name']}: {io['dtype']} {io['shape']}")
    click.echo(f"quantizable weights: {len(info['weights'])}, {info['weight_params']:,} parameters, "
               f"{info['weight_bytes']:,} B")
    width = max((len(w["name"]) for w in info["weights"]), default=4)
    click.echo(f"  {'name':{width}s}  {'op':13s} {'shape':22s} {'bytes':>12s}")
    for w in info["weights"]:
        click.echo(f"  {w['name']:{width}s}  {w['op']:13s} {str(w['shape']):22s} {w['bytes']:>12,}")
    for name, why in info["skipped_weights"].items():
        click.echo(f"  skipped {name}: {why}")


@main.command()
@click.argument("fp32_model", type=click.Path(dir_okay=False))
@click.argument("quant_model", type=click.Path(dir_okay=False))
@calib_options
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help=".npy of integer labels aligned with the data: adds top-1 accuracy of both models.")
@click.option("--repeats", type=click.IntRange(min=1), default=30, show_default=True,
              help="Timed runs for the median latency.")
@json_option
@quiet_option
@handle_errors
def evaluate(fp32_model, quant_model, calib, calib_size, batch_size, image_size, mean, std, layout, device, labels,
             repeats, as_json, quiet):
    """Compare QUANT_MODEL with FP32_MODEL on data: SQNR, max error, agreement, sizes, latency.

    \b
    Example:
      cet-onnx evaluate models/digits/model.onnx digits.int8.onnx \\
          --calib models/digits/eval.npz --labels models/digits/eval_labels.npy
    """
    from .evaluate import evaluate_models
    from .progress import set_quiet
    set_quiet(quiet or as_json)
    result = evaluate_models(fp32_model, quant_model, calib, calib_size=calib_size, batch_size=batch_size,
                             image=_image_options(image_size, mean, std, layout), device=device,
                             labels=labels, repeats=repeats)
    if as_json:
        emit_json({"ok": True, **result})
        return
    click.echo(f"{result['samples']} samples")
    for o in result["outputs"]:
        agree = f", top-1 agreement {100 * o['top1_agreement']:.2f} %" if o["top1_agreement"] is not None else ""
        click.echo(f"  {o['name']}: SQNR {_fmt_sqnr(o['sqnr_db'])}, max |err| {o['max_abs_error']:.4g}{agree}")
    if result.get("accuracy"):
        a = result["accuracy"]
        click.echo(f"top-1 accuracy: float {100 * a['fp32']:.2f} %, quantized {100 * a['quantized']:.2f} %")
    s = result["file_bytes"]
    click.echo(f"file size: float {s['fp32']:,} B, quantized {s['quantized']:,} B ({s['fp32'] / s['quantized']:.2f}x)")
    lat = result["latency_ms"]
    click.echo(f"median latency (batch {lat['batch']}): float {lat['fp32']:.3f} ms, quantized {lat['quantized']:.3f} ms "
               f"({lat['fp32'] / lat['quantized']:.2f}x)")


if __name__ == "__main__":
    main()
