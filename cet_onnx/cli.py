"""The ``cet-onnx`` command line (click).

Exit codes: 0 success, 1 runtime failure (including a failed verification gate),
2 usage or input error. ``--json`` prints exactly one JSON object on stdout, errors included;
human-readable text and progress go to stderr / stdout as usual otherwise.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Callable

import click

from cet_onnx import __version__
from cet_onnx.allocation.allocate import ALLOCATORS, PROBED_ALLOCATORS
from cet_onnx.allocation.losses import LOSSES
from cet_onnx.allocation.stage import PROBE_MODES, PROBE_NUMERICS
from cet_onnx.calibration.data import LAYOUTS, ImageOptions
from cet_onnx.calibration.ranges import METHODS
from cet_onnx.errors import CetError, InputError
from cet_onnx.kernels import FAST_KERNELS
from cet_onnx.options import ActivationOptions, AllocationOptions, DataOptions, QuantizeOptions, RoundingOptions, \
    DEFAULT_ACCURACY_LEVEL, RunOptions, WeightOptions, candidate_block as candidate_block_for
from cet_onnx.quant.quantizer import ACTIVATION_BITS, CLIP_MODES, GRIDS, SATURATION_SAFE_BITS
from cet_onnx.report import strict_json
from cet_onnx.rounding.plan import ROUNDING_METHODS
from cet_onnx.runner import DEVICES
from cet_onnx.tensor_errors import worst



def emit_json(obj: dict) -> None:
    click.echo(json.dumps(strict_json(obj), indent=2, default=str))


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


def labels_option(help: str) -> Callable:
    return click.option("--labels", type=click.Path(dir_okay=False), default=None, help=help)


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
        click.option("--layout", type=click.Choice(LAYOUTS), default="NCHW", show_default=True,
                     help="Image tensor layout."),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="onnxruntime execution provider (auto: CUDA when available)."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def probe_options(fn: Callable) -> Callable:
    """Options of the sensitivity probes, shared by quantize and analyze."""
    options = [
        click.option("--bits", "bits", default="2,4,8", show_default=True, metavar="B[,B...]",
                     help="Candidate bit-widths for the allocator (each 2..8)."),
        click.option("--candidate-block", default=None, metavar="N[,N...]",
                     help="Block sizes of the block-wise candidates (default: --block-size, else 32,128; "
                          "0: per-channel only)."),
        click.option("--loss", type=click.Choice(LOSSES), default=None,
                     help="Loss the probes measure (default: ce with --labels, else by what the output means: "
                          "kl for logits / probabilities, cosine for embeddings, mse otherwise)."),
        click.option("--loss-output", default=None, metavar="NAME", help="Model output the loss is measured on."),
        labels_option(".npy of integer labels aligned with the --calib samples (task loss 'ce')."),
        click.option("--weight-clip", type=click.Choice(CLIP_MODES), default="auto", show_default=True,
                     help="Weight clipping range: per-group MSE search (auto: at 4 bits and below) or max |w|."),
        click.option("--weight-grid", type=click.Choice(GRIDS), default="auto",
                     show_default=True,
                     help="Weight grid: asymmetric uses all 2^b codes with a zero point (auto: at 4 bits and below; "
                          "8-bit stays symmetric for onnxruntime's integer kernels)."),
        click.option("--int8-full-range", is_flag=True,
                     help="INT8 weights that onnxruntime multiplies in u8 x s8 integer kernels (QLinearConv / "
                          "QLinearMatMul, MatMulInteger) keep codes up to +-127 instead of +-63. Only for servers "
                          "with AVX-512 VNNI / AVX-VNNI or ARM: without VNNI these kernels saturate at full range."),
        click.option("--rounding", type=click.Choice(ROUNDING_METHODS), default="auto", show_default=True,
                     help="Weight rounding: round-to-nearest, or major-axis (GPTQ-style error feedback with the "
                          "layer Hessian of the calibration inputs; auto: major-axis when --calib is given)."),
        click.option("--sequential", is_flag=True,
                     help="Major-axis rounding with each layer's Hessian taken from the already-quantized prefix."),
        click.option("--probe-numerics", type=click.Choice(PROBE_NUMERICS), default="float", show_default=True,
                     help="Activations in the probes: float, or quantized as deployed (noisier: see README)."),
        click.option("--probes", type=click.Choice(PROBE_MODES), default=None,
                     help="CET probes: fast (one-sided; costs of 4+ bit formats scaled from one probe with the "
                          "layer's quadratic form) or full (both finite differences of every format). "
                          "Default: fast for quantize, full for analyze (which reports both terms)."),
        click.option("--probe-size", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Calibration samples each probe runs on."),
        click.option("--hutchinson-samples", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Random directions per weight for --allocator hawq."),
        click.option("--fidelity-samples", type=click.IntRange(min=0), default=12, show_default=True,
                     help="Random assignments whose measured loss is compared with the prediction."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Probe cache folder (default: $CET_ONNX_CACHE or ~/.cache/cet-onnx)."),
        click.option("--no-cache", is_flag=True, help="Neither read nor write the probe cache."),
        click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Run the probes in N worker processes, each with its own onnxruntime session; same "
                          "results as serial (default: 1, or with --ray the cluster's CPU count)."),
        click.option("--ray", "ray", default=None, metavar="auto|ADDRESS",
                     help="Run the probes in Ray actors: auto starts a local cluster unless one is running, "
                          "ADDRESS joins one (pip install 'cet-onnx[ray]')."),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _blocks_list(text: str | None) -> tuple[int, ...] | None:
    """``--candidate-block``: comma-separated block sizes (0: none), or None when not given."""
    if text is None:
        return None
    try:
        blocks = tuple(int(b) for b in str(text).split(","))
    except ValueError:
        raise InputError(f"--candidate-block: expected comma-separated integers, got '{text}'") from None
    if any(b < 0 or b == 1 for b in blocks):
        raise InputError(f"--candidate-block: block sizes must be 0 or at least 2, got '{text}'")
    return blocks


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise InputError(f"--bits: expected comma-separated integers, got '{text}'") from None
    if not bits or min(bits) < 2 or max(bits) > 8:
        raise InputError(f"--bits: every width must be between 2 and 8, got '{text}'")
    return bits


json_option = click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON result on stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
calib_method_option = click.option("--calib-method", type=click.Choice(METHODS), default="mse", show_default=True,
                                   help="How activation ranges are chosen.")
no_simplify_option = click.option("--no-simplify", is_flag=True, help="Skip onnxsim simplification.")
seed_option = click.option("--seed", type=int, default=0, show_default=True,
                           help="Seed for random data and random probes.")


def _name_value_pairs(_ctx: click.Context, _param: click.Parameter, given: tuple[str, ...]) -> tuple:
    """``NAME=VALUE`` texts as (name, value) pairs."""
    pairs = []
    for text in given:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise click.BadParameter(f"expected NAME=VALUE, got '{text}'")
        pairs.append((name, value))
    return tuple(pairs)


fix_input_option = click.option(
    "--fix-input", "fix_inputs", multiple=True, metavar="NAME=VALUE", callback=_name_value_pairs,
    help="Freeze model input NAME to VALUE (a scalar, or comma-separated values for a fixed shape) before "
         "simplification, so that what depends on it (an If on a sample rate or mode flag) folds away. "
         "Repeatable. Calibration data may leave the input out.")


def weight_only_option(help: str) -> Callable:
    return click.option("--weight-only", is_flag=True, help=help)


def act_symmetric_option(help: str) -> Callable:
    return click.option("--act-symmetric", is_flag=True, help=help)


def block_size_option(help: str) -> Callable:
    return click.option("--block-size", type=click.IntRange(min=2), default=None, help=help)


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
@click.option("--act-bits", type=click.Choice([str(b) for b in ACTIVATION_BITS]), default="8", show_default=True, help="Bits per activation.")
@click.option("--act-mode", type=click.Choice(["auto", "static", "dynamic", "none"]), default="auto", show_default=True,
              help="static: calibrated Q/DQ on activations (QLinearConv / QLinearMatMul); dynamic: INT8-weight "
                   "MatMuls quantize their input at run time (DynamicQuantizeMatMul), other activations float; "
                   "none: weight-only. auto: dynamic for graphs with attention or LayerNorm (with Conv weights: static "
                   "when static 8-bit activations, checked first, keep the --act-min-* target), else static.")
@click.option("--act-precision", type=click.Choice(["auto", "uniform", "solve"]), default="auto", show_default=True,
              help="Static mode: each activation's precision. uniform: every one at --act-bits; solve: 8-bit, 16-bit "
                   "or float per tensor, the fastest choice (measured) that meets the target on the probe samples; "
                   "auto: uniform when that meets the target, else solve.")
@click.option("--act-min-agreement", type=click.FloatRange(0, 1), default=0.98, show_default=True, metavar="FRACTION",
              help="--act-precision target for logits / probabilities: top-1 agreement with the float model.")
@click.option("--act-min-cosine", type=click.FloatRange(-1, 1), default=0.99, show_default=True, metavar="C",
              help="--act-precision target for embeddings: mean cosine similarity to the float model's.")
@click.option("--act-min-sqnr", type=float, default=20.0, show_default=True, metavar="DB",
              help="--act-precision target for other float outputs: SQNR against the float model's.")
@weight_only_option("Same as --act-mode none.")
@act_symmetric_option("Signed symmetric activations instead of unsigned asymmetric.")
@click.option("--per-tensor", is_flag=True, help="One scale per weight instead of one per output channel.")
@block_size_option("Block-wise scales: one per output channel and N input channels (opset 21). "
                   "Weights with fewer than N input channels stay per-channel.")
@calib_method_option
@click.option("--percentile", type=click.FloatRange(50, 100), default=99.999, show_default=True,
              help="Percentile for --calib-method percentile.")
@no_simplify_option
@fix_input_option
@click.option("--keep-fixed-inputs", is_flag=True,
              help="With --fix-input: the quantized model still declares the fixed inputs (callers keep feeding "
                   "them; the value fed is ignored).")
@click.option("--verify-size", type=click.IntRange(min=0), default=64, show_default=True,
              help="Held-out samples (taken from the end of the data, never used to calibrate) to verify on.")
@click.option("--verify-min-sqnr", type=float, default=None, metavar="DB",
              help="Exit 1 (and write nothing) if any output's SQNR is below DB.")
@click.option("--verify-min-agreement", type=click.FloatRange(0, 1), default=None, metavar="FRACTION",
              help="Exit 1 (and write nothing) if top-1 agreement with the float model is below FRACTION.")
@click.option("--verify-max-latency-ratio", type=click.FloatRange(min=0, min_open=True), default=None, metavar="R",
              help="Exit 1 (and write nothing) if the quantized model's median latency is above R times the "
                   "float model's (measured at --latency-batch).")
@click.option("--latency-batch", type=click.IntRange(min=0), default=1, show_default=True, metavar="N",
              help="Samples per run when timing the float and the quantized model side by side (0: do not time).")
@click.option("--latency-threads", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="onnxruntime intra-op threads when timing (0: onnxruntime's default, one per physical core).")
@click.option("--avg-bits", type=click.FloatRange(min=0, min_open=True), default=None, metavar="X",
              help="Mixed precision: average stored bits per weight parameter, scales and zero points included.")
@click.option("--max-size", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MB",
              help="Mixed precision: bytes (1 MB = 10^6) of the emitted weights, scales and zero points included.")
@click.option("--max-loss", type=float, default=None, metavar="E",
              help="Mixed precision: smallest weights whose measured loss stays <= E (closed loop).")
@click.option("--max-latency", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MS",
              help="With a size or loss budget: the predicted latency (at --latency-batch, --latency-threads, "
                   "--device) must stay <= MS; each layer's formats are timed in onnxruntime.")
@click.option("--max-latency-ratio", type=click.FloatRange(min=0, min_open=True), default=None, metavar="R",
              help="Like --max-latency, relative to the float model's measured latency (1.0: no slower than float).")
@click.option("--emit-contrib", is_flag=True,
              help="Write low-bit MatMul weights as com.microsoft.MatMulNBits nodes instead of plain ONNX "
                   "DequantizeLinear -> MatMul (which onnxruntime fuses into the same kernel at load time). "
                   "The file then needs onnxruntime.")
@click.option("--widen-low-bit/--no-widen-low-bit", default=True, show_default=True,
              help="Per-channel INT4 / INT2 weights of layers with quantized activations keep their narrow codes "
                   "in the file behind a Cast to INT8, which onnxruntime folds at load, so they run in its INT8 "
                   "kernels (QLinearConv, DynamicQuantizeMatMul); the model then needs onnxruntime >= 1.23. "
                   "--no-widen-low-bit writes them plainly (MatMulNBits form or dequantized on every run), "
                   "loadable by onnxruntime >= 1.19.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None, metavar="0-4",
              help=f"With --emit-contrib: MatMulNBits' accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
                   f"input compute) [default: {DEFAULT_ACCURACY_LEVEL}, as onnxruntime's own fusion].")
@click.option("--allocator", type=click.Choice(ALLOCATORS), default="cet", show_default=True,
              help="How a budget is spent: CET probes, Hessian-trace proxy, layer SQNR, or one bit-width for all.")
@click.option("--refine-rounds", type=click.IntRange(min=0), default=3, show_default=True,
              help="cet under a size budget: closed-loop rounds that re-measure each weight's cost in context "
                   "and solve again (n+1 forward passes each); 0 trusts the additive prediction.")
@probe_options
@click.option("--reproducible", is_flag=True,
              help="Leave wall-clock fields (timings, throughput) out of the report, so identical runs give "
                   "byte-identical models and reports.")
@seed_option
@json_option
@quiet_option
@handle_errors
def quantize(model, output, calib, calib_size, batch_size, image_size, mean, std, layout, device, weight_bits,
             act_bits, act_mode, act_precision, act_min_agreement, act_min_cosine, act_min_sqnr, weight_only, act_symmetric, per_tensor, block_size, calib_method, percentile, no_simplify,
             fix_inputs, keep_fixed_inputs, verify_size, verify_min_sqnr, verify_min_agreement, verify_max_latency_ratio, latency_batch,
             latency_threads, avg_bits, max_size, max_loss, max_latency, max_latency_ratio, emit_contrib, widen_low_bit, accuracy_level, allocator,
             refine_rounds, bits,
             candidate_block, loss, loss_output, labels, weight_clip, weight_grid, int8_full_range, rounding, sequential, probe_numerics, probes, probe_size, hutchinson_samples, fidelity_samples,
             cache_dir, no_cache, workers, ray, reproducible, seed, as_json, quiet):
    """Quantize MODEL and write the result to -o OUTPUT (plus OUTPUT's .report.json).

    Without a budget every weight gets --weight-bits. With --avg-bits, --max-size or
    --max-loss each weight gets its own format (bit-width and scale granularity), chosen by
    --allocator from the candidates --bits x {per-channel, blocks of --candidate-block}.

    \b
    Examples:
      cet-onnx quantize models/digits/model.onnx -o digits.w4.onnx \\
          --calib models/digits/calib.npz --weight-bits 4 --block-size 32
      cet-onnx quantize models/digits/model.onnx -o digits.mixed.onnx \\
          --calib models/digits/calib.npz --avg-bits 3
    """
    from cet_onnx.pipeline import quantize as run_quantize
    from cet_onnx.progress import set_quiet
    from cet_onnx.report import report_path
    set_quiet(quiet or as_json)
    opts = QuantizeOptions(
        data=DataOptions(batch_size=batch_size, calib_size=calib_size, verify_size=verify_size,
                         image=_image_options(image_size, mean, std, layout), labels=labels),
        weights=WeightOptions(bits=weight_bits, per_tensor=per_tensor, block_size=block_size, clip=weight_clip,
                              grid=weight_grid, int8_full_range=int8_full_range),
        activations=ActivationOptions(bits=int(act_bits), weight_only=weight_only, symmetric=act_symmetric,
                                      method=calib_method, percentile=percentile, mode=act_mode,
                                      precision=act_precision, min_agreement=act_min_agreement,
                                      min_cosine=act_min_cosine, min_sqnr_db=act_min_sqnr),
        weight_rounding=RoundingOptions(method=rounding, sequential=sequential),
        allocation=_allocation_options(bits, candidate_block, block_size, loss, loss_output, probe_numerics,
                                       probe_size, hutchinson_samples, fidelity_samples, cache_dir, no_cache,
                                       probes=probes or "fast", workers=workers, ray=ray, allocator=allocator, avg_bits=avg_bits, max_size_mb=max_size,
                                       max_loss=max_loss, refine_rounds=refine_rounds, max_latency_ms=max_latency,
                                       max_latency_ratio=max_latency_ratio),
        run=RunOptions(device=device, simplify=not no_simplify, seed=seed, reproducible=reproducible,
                       latency_batch=latency_batch, latency_threads=latency_threads, fix_inputs=fix_inputs,
                       keep_fixed_inputs=keep_fixed_inputs,
                       emit_contrib=_contrib_level(emit_contrib, accuracy_level), widen_low_bit=widen_low_bit))
    report = run_quantize(model, output, calib, opts, verify_min_sqnr, verify_min_agreement,
                          max_latency_ratio=verify_max_latency_ratio)
    if as_json:
        emit_json({"ok": True, **report})
        return
    _print_quantize_summary(report, report_path(output))


def _contrib_level(emit_contrib: bool, accuracy_level: int | None) -> int | None:
    """``--emit-contrib`` / ``--accuracy-level`` as the options' one field (None: plain ONNX)."""
    if accuracy_level is not None and not emit_contrib:
        raise InputError("--accuracy-level sets com.microsoft.MatMulNBits' accuracy; it needs --emit-contrib")
    if not emit_contrib:
        return None
    return DEFAULT_ACCURACY_LEVEL if accuracy_level is None else accuracy_level


def _allocation_options(bits, candidate_block, block_size, loss, loss_output, probe_numerics, probe_size,
                        hutchinson_samples, fidelity_samples, cache_dir, no_cache, **budget) -> AllocationOptions:
    """The allocation group from the probe options both commands share (``budget``: quantize's own, and workers)."""
    return AllocationOptions(bits=_bits_list(bits),
                             candidate_block=candidate_block_for(_blocks_list(candidate_block), block_size),
                             loss=loss, loss_output=loss_output, probe_size=probe_size,
                             hutchinson_samples=hutchinson_samples, fidelity_samples=fidelity_samples,
                             cache_dir=cache_dir, use_cache=not no_cache, probe_numerics=probe_numerics, **budget)


def _fmt_sqnr(v) -> str:
    return "inf" if v == float("inf") else f"{v:.2f} dB"


def _output_metric(o: dict) -> str:
    """", top-1 agreement ..." for logits, ", cosine ..." for embeddings, "" for other outputs; and for a
    token-level output how many positions counted."""
    p = o.get("positions")
    tokens = f" over {p['counted']:,} of {p['of']:,} positions (the tokens of '{p['mask']}')" if p else ""
    if o.get("top1_agreement") is not None:
        return f", top-1 agreement {100 * o['top1_agreement']:.2f} %{tokens}"
    if o.get("mean_cosine") is not None:
        return f", cosine to float: mean {o['mean_cosine']:.5f}, worst {o['min_cosine']:.5f} ({o['kind']}){tokens}"
    return tokens


def _say_activations(say: Callable, report: dict) -> None:
    """The activation mode, and the planned activations left float (with why), at most a few by name."""
    left = report.get("activations_left_float") or {}
    mode = report.get("activation_mode")
    if mode and mode["mode"] == "dynamic":
        say(f"activations: dynamic ({mode['why']}), {mode['dynamic_matmuls']} MatMul/Gemm inputs quantized at run time")
    elif mode:
        say(f"activations: {mode['mode']} ({mode['why']}), {report['activation_tensors']} with static Q/DQ")
    _say_activation_plan(say, report.get("activation_precision") or {})
    if left:
        say(f"  {len(left)} planned activation tensor(s) left float:")
        for name, why in list(left.items())[:5]:
            say(f"    {name}: {why}")
        if len(left) > 5:
            say(f"    ... and {len(left) - 5} more (see the report's activations_left_float)")


def _say_activation_plan(say: Callable, plan: dict) -> None:
    """How each activation's precision was chosen (--act-precision), loudly when no choice met the target."""
    if plan.get("precision") == "per tensor":
        c = plan["counts"]
        say(f"activation precision per tensor ({plan['why']}): {c['int8']} int8, {c['int16']} int16, "
            f"{c['float']} float; probe samples: {plan['closed_loop'][-1]['measured']}")
    elif "uniform" in plan:
        say(f"activation precision: uniform ({plan['why']})")
    if "warning" in plan:
        say(f"WARNING: activations: {plan['warning']}")


def _say_speed(say: Callable, report: dict) -> None:
    """The kernels onnxruntime runs, the measured latency, and a loud warning when the result is slower than float."""
    k, lat = report.get("kernels") or {}, report.get("latency") or {}
    if "ops" in k:
        fast = {op: n for op, n in k["ops"].items() if op in FAST_KERNELS}
        slow = k["dequantized_at_run_time"]
        say("onnxruntime kernels: " + (", ".join(f"{op} x{n}" for op, n in fast.items()) or "no integer kernels")
            + f"; {len(slow)} weight(s) dequantized on every run"
            + (" (" + ", ".join(sorted({s['consumer_op'] for s in slow})) + ")" if slow else ""))
    if "ratio" in lat:
        say(f"latency (batch {lat['batch']}, threads: {lat['threads']}, {lat['provider']}, median of "
            f"{lat['interleaved_runs']} interleaved runs): float {lat['fp32_ms']:.3f} ms, quantized "
            f"{lat['quantized_ms']:.3f} ms ({lat['ratio']:.2f}x)")
        if lat["ratio"] > 1.0:
            slow = k.get("dequantized_at_run_time") or []
            why = (f": {len(slow)} weight(s) have no fast onnxruntime kernel in their format and are dequantized "
                   f"on every run (onnxruntime runs an INT2 / INT4 weight fast only per channel with quantized "
                   f"activations, in its INT8 kernels, or as a blocked MatMul weight in MatMulNBits; INT8 Conv / MatMul "
                   f"weights fuse into QLinearConv / QLinearMatMul with static activations)" if slow else "")
            advice = _speed_advice(report, slow, lat)
            say(f"WARNING: the quantized model is {lat['ratio']:.2f}x SLOWER than the float model{why}. "
                f"{advice}; README 'Speed' explains the trade-off.")
    elif lat.get("skipped"):
        say(f"latency: {lat['skipped']}")


def _speed_advice(report: dict, slow: list[dict], lat: dict) -> str:
    """What to change for speed: low-bit weights to 8 bits or per channel (or a latency budget), or static
    activations for 8-bit ones."""
    if not slow:
        return (f"No weight is dequantized on every run: the extra time is the activations' quantize / "
                f"dequantize steps (float {lat['fp32_ms']:.3f} ms a run), or timing noise on a busy machine")
    bits = {w["name"]: w.get("bits") for w in report.get("weights", [])}
    low = [s for s in slow if (bits.get(s.get("weight")) or 4) < 7]
    mode = (report.get("activation_mode") or {}).get("mode")
    eight = (f"8-bit weights run fast only inside QLinearConv / QLinearMatMul, which need static 8-bit activations "
             f"around them (activation mode here: {mode}); " +
             ("the activation plan left some of theirs float or 16-bit to keep the accuracy target (the report's "
              "activations_left_float); --act-precision uniform puts every planned tensor at --act-bits"
              if mode == "static" else
              "--act-mode static gives them that (its activation plan keeps the accuracy target)"))
    if not low:
        return f"Those weights are 8-bit already: {eight}"
    advice = (f"For speed, give those {len(low)} sub-8-bit weight(s) 8 bits (--weight-bits 8, or --bits 8 in a budget)"
              + (", or per-channel formats (--candidate-block 0 in a budget), which run in the INT8 kernels"
                 if mode == "static" else "")
              + ("; with a budget, --max-latency-ratio 1.0 lets the solver weigh speed against size"
                 if report.get("allocation") else ""))
    return advice if len(low) == len(slow) else f"{advice}; the other {len(slow) - len(low)} are 8-bit: {eight}"


def _say_tensor_errors(say: Callable[[str], None], report: dict) -> None:
    """The few worst activations and weights by SQNR against the float model."""
    te = report.get("tensor_errors") or {}
    rows = te.get("tensors") or []
    if not rows:
        return
    where = {"verify": "held-out", "calibration": "calibration"}.get(te.get("batches"), "")
    say(f"worst tensors (SQNR against the float model{', ' + where + ' data' if where else ''}; "
        f"all {len(rows)} in the report's tensor_errors):")
    for r in worst(rows, "activation") + worst(rows, "weight"):
        own = (f", its quantizer alone {_fmt_sqnr(r['quantizer_sqnr_db'])}"
               if r["kind"] == "activation" and r.get("quantizer_sqnr_db") is not None else "")
        say(f"  {r['kind']} '{r['name']}' ({r['precision']}, {r['role']}): {_fmt_sqnr(r['sqnr_db'])}{own}")


def _verified_on(report: dict) -> str:
    """``64 held-out samples``, or for runs their count (verification counts output rows), held out or not."""
    c = report["calibration"]
    if not c.get("feeds_are_runs"):
        return f"{report['verification']['samples']} held-out samples"
    return f"{c['verify_samples']} {'held-out ' if c['disjoint'] else 'calibration '}run(s)"


def _say_inputs(say: Callable, report: dict) -> None:
    """Inputs fixed by --fix-input, and why calibration feeds were runs (when they were)."""
    fixed = report.get("fixed_inputs") or {}
    if fixed:
        kept = next(iter(fixed.values()))["kept_in_signature"]
        say("fixed inputs: " + ", ".join(f"{k}={v['value']}" for k, v in fixed.items())
            + (" (still declared; their value is ignored)" if kept else " (removed from the model's inputs)"))
    why = report["calibration"].get("feeds_are_runs")
    if why:
        say(f"calibration: each feed is one run ({why})")


def _print_quantize_summary(report: dict, report_file: Path) -> None:
    """The short human summary of a quantize run, on stderr (stdout is kept for --json)."""
    say = functools.partial(click.echo, err=True)
    t = report["totals"]
    v = report["verification"]
    say(f"wrote {report['output']} (opset {report['opset']}) and {report_file}")
    say(f"weights: {len(report['weights'])} tensors, {t['weight_params']:,} parameters, "
        f"{t['weight_bytes_fp32']:,} B -> {t['weight_bytes']:,} B "
        f"({t['weight_compression']:.2f}x, {t['avg_bits']:.2f} bits/weight incl. scales)")
    say(f"files: {t['file_bytes_fp32']:,} B -> {t['file_bytes']:,} B")
    narrowed = sum(1 for w in report["weights"] if w.get("integer_kernel") and w["bits"] == SATURATION_SAFE_BITS)
    if narrowed:
        say(f"  {narrowed} INT8 weight(s) of onnxruntime's integer kernels take codes within +-63 (int7): full-range "
            "codes saturate on x86 CPUs without VNNI; --int8-full-range keeps +-127 for VNNI / ARM servers")
    _say_inputs(say, report)
    _say_activations(say, report)
    if v["samples"]:
        say(f"verified on {_verified_on(report)}:")
        for o in v["outputs"]:
            say(f"  {o['name']}: SQNR {_fmt_sqnr(o['sqnr_db'])}, max |err| {o['max_abs_error']:.4g}{_output_metric(o)}")
    if v.get("accuracy"):
        say(f"  top-1 accuracy on them: float {100 * v['accuracy']['fp32']:.2f} %, "
            f"quantized {100 * v['accuracy']['quantized']:.2f} %")
    _say_tensor_errors(say, report)
    a = report.get("allocation")
    if a:
        counts: dict[str, int] = {}
        for w in report["weights"]:
            counts[w["format"]] = counts.get(w["format"], 0) + 1
        say(f"allocation ({a['allocator']}, {a['budget']}, loss {a['loss']} on '{a['loss_output']}'): "
            + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())))
        pred = "n/a" if a["predicted_loss"] is None else f"{a['predicted_loss']:.4g}"
        say(f"  loss: float weights {a['base_loss']:.4g}, predicted {pred}, measured {a['measured_loss']:.4g}")
        f = a.get("fidelity")
        if f:
            corrected = (f" (closed-loop corrected costs: Spearman {f['spearman_corrected']:.3f})"
                         if "spearman_corrected" in f else "")
            say(f"  fidelity over {len(f['assignments'])} random assignments: Spearman {f['spearman']:.3f}, "
                f"median measured/predicted {f['median_measured_over_predicted']:.2f}{corrected}")
        say(f"  probes ({a.get('probes', 'full')}): {a['probe_runs']} forward passes in {a['probe_seconds']:.1f}s "
            f"({a['forward_passes_per_second']:.1f}/s on {a['device']})")
        lb = a.get("latency_budget")
        if lb:
            say(f"  latency budget ({lb['constraint']}, batch {lb['batch']}): float {lb['float_ms']:.3f} ms, "
                f"budget {lb['budget_ms']:.3f} ms, predicted {lb['predicted_ms']:.3f} ms "
                f"(every layer's formats timed; anchored on {lb.get('anchor', 'the fastest assignment')}, "
                f"measured {lb['fastest_assignment_ms']:.3f} ms)")
            kept = a.get("kept_float") or {}
            if kept:
                say(f"  {len(kept)} weight(s) kept float ({next(iter(kept.values()))}): "
                    + ", ".join(list(kept)[:5]) + (", ..." if len(kept) > 5 else ""))
            loop = lb.get("closed_loop") or []
            if loop:
                say("  latency closed loop: " + ", ".join(f"predicted {h['predicted_ms']:.3f} / measured "
                                                          f"{h['measured_ms']:.3f} ms" for h in loop))
            lat = report.get("latency") or {}
            ratio_budget = lb.get("max_ratio")
            over = (lat.get("ratio", 0) > ratio_budget if ratio_budget is not None
                    else lat.get("quantized_ms", 0) > lb["budget_ms"])
            if "ratio" in lat and over:
                say(f"  WARNING: the measured latency ({lat['quantized_ms']:.3f} ms, {lat['ratio']:.2f}x float) is above "
                    f"the budget: layer costs do not add up exactly, and timings vary on a busy machine; "
                    f"--verify-max-latency-ratio makes it a hard gate")
        if a.get("pareto_png"):
            say(f"  Pareto front: {a['pareto_png']}")
    _say_speed(say, report)
    say("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in report["timings_s"].items()))
    peaks = report.get("peak_rss_mb") or {}
    if peaks:
        top = max(peaks.values())
        first = next(k for k, v in peaks.items() if v == top)
        say(f"memory: peak RSS {top:,.0f} MB, reached by the end of '{first}'")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, metavar="PREFIX",
              help="Write PREFIX.json and PREFIX.csv (default: MODEL's name + .sensitivity).")
@calib_options
@weight_only_option("Probe without activation quantization.")
@act_symmetric_option("Signed symmetric activations.")
@calib_method_option
@block_size_option("Block size of block-wise candidates.")
@click.option("--allocators", default="cet", show_default=True, metavar="A[,A]",
              help="Sensitivities to measure: cet, hawq, sqnr.")
@no_simplify_option
@fix_input_option
@probe_options
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many most / least sensitive weights to print.")
@click.option("--activations", is_flag=True,
              help="Probe the activation quantizers instead of the weights: per tensor static mode would "
                   "quantize, the loss change when it alone takes 8 / 16 bits, and its own SQNR.")
@click.option("--joint", is_flag=True,
              help="With --activations: also probe every weight, and check the summed prediction of weights and "
                   "activations on random assignments of both (--fidelity-samples of them).")
@click.option("--compare-methods", is_flag=True,
              help="With --activations: also probe every 8-bit point with each range method "
                   f"({', '.join(METHODS)}) and name the best per tensor.")
@seed_option
@json_option
@quiet_option
@handle_errors
def analyze(model, output, calib, calib_size, batch_size, image_size, mean, std, layout, device, weight_only,
            act_symmetric, calib_method, block_size, allocators, no_simplify, fix_inputs, bits, candidate_block, loss, loss_output,
            labels, weight_clip, weight_grid, int8_full_range, rounding, sequential, probe_numerics, probes, probe_size, hutchinson_samples, fidelity_samples, cache_dir, no_cache, workers, ray, top, activations,
            joint, compare_methods, seed,
            as_json, quiet):
    """Probe MODEL's sensitivity only: per weight and format, first-order and curvature terms.

    Writes a JSON and a CSV table and prints the most and least sensitive weights, plus the
    fidelity of the additive prediction on random assignments. With --activations, the same for
    every activation quantizer static mode would place (8 and 16 bits, each point alone); with
    --joint too, both kinds, and the fidelity of their summed prediction on random assignments of
    weight formats and activation points together.

    \b
    Example:
      cet-onnx analyze models/digits/model.onnx --calib models/digits/calib.npz -o digits.sens
      cet-onnx analyze models/digits/model.onnx --calib models/digits/calib.npz --activations
      cet-onnx analyze models/digits/model.onnx --calib models/digits/calib.npz --activations --joint
    """
    from cet_onnx.analysis_io import sensitivity_ranking, write_analysis
    from cet_onnx.pipeline import analyze as run_analyze
    from cet_onnx.progress import set_quiet
    set_quiet(quiet or as_json)
    names = tuple(a.strip() for a in allocators.split(",") if a.strip())
    if not names or any(a not in PROBED_ALLOCATORS for a in names):
        raise InputError(f"--allocators: expected a list of {', '.join(PROBED_ALLOCATORS)}, got '{allocators}'")
    opts = QuantizeOptions(
        data=DataOptions(batch_size=batch_size, calib_size=calib_size,
                         image=_image_options(image_size, mean, std, layout), labels=labels),
        weights=WeightOptions(clip=weight_clip, grid=weight_grid, int8_full_range=int8_full_range),
        activations=ActivationOptions(weight_only=weight_only, symmetric=act_symmetric, method=calib_method),
        weight_rounding=RoundingOptions(method=rounding, sequential=sequential),
        allocation=_allocation_options(bits, candidate_block, block_size, loss, loss_output, probe_numerics,
                                       probe_size, hutchinson_samples, fidelity_samples, cache_dir, no_cache,
                                       probes=probes or "full", workers=workers, ray=ray),
        run=RunOptions(device=device, simplify=not no_simplify, seed=seed, fix_inputs=fix_inputs))
    if compare_methods and not activations:
        raise InputError("--compare-methods compares activation range methods: it needs --activations")
    if joint and not activations:
        raise InputError("--joint checks weights and activations together: it needs --activations")
    result = run_analyze(model, calib, opts, names, activations, METHODS if compare_methods else (), joint)
    prefix = output or str(Path(model).with_suffix("")) + (".activations" if activations else ".sensitivity")
    paths = write_analysis(result, prefix)
    if as_json:
        emit_json({"ok": True, "files": [str(p) for p in paths], **result})
        return
    if activations:
        _print_activation_analysis(result, top)
        click.echo("wrote " + ", ".join(str(p) for p in paths))
        return
    click.echo(f"loss {result['loss']} on '{result['loss_output']}' over {result['probe_samples']} samples; "
               f"float-weight loss {result['base_loss']:.4g}; {result['probe_runs']} forward passes in "
               f"{result['probe_seconds']:.1f}s ({result['forward_passes_per_second']}/s)")
    lowest, ranked = sensitivity_ranking(result, names)
    click.echo(f"most sensitive at {lowest}:")
    for r in ranked[:top]:
        click.echo(f"  {r['name']} ({r['op']}, {r['params']:,} params): predicted dL {r['formats'][lowest]['predicted']:.4g}")
    click.echo(f"least sensitive at {lowest}:")
    for r in ranked[::-1][:top]:
        click.echo(f"  {r['name']} ({r['op']}, {r['params']:,} params): predicted dL {r['formats'][lowest]['predicted']:.4g}")
    fid = result.get("fidelity")
    if fid:
        click.echo(f"fidelity over {len(fid['assignments'])} random assignments: Spearman {fid['spearman']:.3f}, "
                   f"median measured/predicted {fid['median_measured_over_predicted']:.2f}")
    click.echo("wrote " + ", ".join(str(p) for p in paths))


def _print_activation_analysis(result: dict, top: int) -> None:
    from cet_onnx.analysis_io import activation_ranking
    acts = result["activations"]
    click.echo(f"loss {result['loss']} on '{result['loss_output']}' over {result['probe_samples']} samples; "
               f"{len(acts['points'])} activation probes ({acts['calib_method']} ranges) in {result['probe_seconds']:.1f}s")
    ranked = activation_ranking(result)
    click.echo("most sensitive activations at int8 static (each alone quantized; weights float):")
    sixteen = {r["tensor"]: r for r in acts["points"] if r["precision"] == "int16 static"}
    for r in ranked[:top]:
        alt = sixteen.get(r["tensor"])
        alt_text = f"; int16: dL {alt['delta_loss']:.4g}" if alt else ""
        click.echo(f"  {r['tensor']}: dL {r['delta_loss']:.4g}, its quantizer {_fmt_sqnr(r['quantizer_sqnr_db'])}{alt_text}")
    for tensor, why in acts["left_float"].items():
        click.echo(f"  left float: {tensor} ({why})")
    best = acts.get("best_method")
    if best:
        other = {t: m for t, m in best.items() if m != acts["calib_method"]}
        counts = {m: list(best.values()).count(m) for m in dict.fromkeys(best.values())}
        click.echo(f"best 8-bit range method per tensor: " + ", ".join(f"{m} x{n}" for m, n in counts.items())
                   + f" ({len(other)} of {len(best)} differ from --calib-method {acts['calib_method']})")
    fid = acts.get("fidelity")
    if fid:
        click.echo(f"fidelity over {len(fid['assignments'])} random sets of 8-bit points: Spearman "
                   f"{fid['spearman']:.3f}, median measured/predicted {fid['median_measured_over_predicted']:.2f}")
    joint = result.get("joint_fidelity")
    if joint:
        click.echo(f"joint fidelity over {len(joint['assignments'])} random assignments of {joint['weights']} weights' "
                   f"formats and {joint['activation_points']} 8-bit activation points: Spearman {joint['spearman']:.3f}, "
                   f"median measured/predicted {joint['median_measured_over_predicted']:.2f}")


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
    from cet_onnx.inspect_model import inspect_model
    info = inspect_model(model)
    if as_json:
        emit_json({"ok": True, **info})
        return
    inner = f" (+{info['subgraph_nodes']} inside If / Loop / Scan bodies)" if info["subgraph_nodes"] else ""
    click.echo(f"{info['model']}: opset {info['opset']}, IR {info['ir_version']}, {info['nodes']} nodes{inner}")
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
@labels_option(".npy of integer labels aligned with the data: adds top-1 accuracy of both models.")
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
    from cet_onnx.evaluate import evaluate_models
    from cet_onnx.progress import set_quiet
    set_quiet(quiet or as_json)
    result = evaluate_models(fp32_model, quant_model, calib, calib_size=calib_size, batch_size=batch_size,
                             image=_image_options(image_size, mean, std, layout), device=device,
                             labels=labels, repeats=repeats)
    if as_json:
        emit_json({"ok": True, **result})
        return
    click.echo(f"{result['samples']} samples")
    for o in result["outputs"]:
        agree = _output_metric(o)
        click.echo(f"  {o['name']}: SQNR {_fmt_sqnr(o['sqnr_db'])}, max |err| {o['max_abs_error']:.4g}{agree}")
    if result.get("accuracy"):
        a = result["accuracy"]
        click.echo(f"top-1 accuracy: float {100 * a['fp32']:.2f} %, quantized {100 * a['quantized']:.2f} %")
    s = result["file_bytes"]
    click.echo(f"file size: float {s['fp32']:,} B, quantized {s['quantized']:,} B ({s['fp32'] / s['quantized']:.2f}x)")
    lat = result["latency_ms"]
    ratio = lat["quantized"] / lat["fp32"]
    click.echo(f"median latency (batch {lat['batch']}): float {lat['fp32']:.3f} ms, quantized {lat['quantized']:.3f} ms "
               f"({ratio:.2f}x the float latency)")
    slow = result["kernels"]["dequantized_at_run_time"]
    if ratio > 1.0:
        ops = ", ".join(sorted({s["consumer_op"] for s in slow}))
        why = (f"{len(slow)} weight(s) are dequantized on every run ({ops}): onnxruntime has no fast kernel for "
               "their format" if slow else
               "no weight is dequantized on every run; the Q/DQ of its activations cost more than they save here")
        click.echo(f"slower than float: {why}. README 'Speed' explains how to choose speed "
                   f"(INT8, or --max-latency-ratio with a size budget).")


if __name__ == "__main__":
    main()
