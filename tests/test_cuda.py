"""The CUDA path: device-resident IO binding in the probe session, and ``--device cuda`` end to end.

Tests marked ``cuda`` that need a GPU skip unless onnxruntime lists ``CUDAExecutionProvider``
(that is, unless ``onnxruntime-gpu`` is installed as README "GPU (CUDA)" says); the one that
checks the error without CUDA runs everywhere, on a CUDA machine by hiding the provider.
``tools/gpu_check.sh`` installs onnxruntime-gpu and runs ``pytest -m cuda`` on a CUDA machine.

Tolerance of CUDA against CPU: cuDNN / cuBLAS kernels sum in another order than the CPU
kernels, so the losses are compared with
``rtol=PROBE_RTOL`` plus ``atol=PROBE_ATOL``; only probes whose loss change is well above that
floor (the 2- and 4-bit formats) are compared, since 8-bit loss changes on this model sit at
the level of that rounding noise.
"""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import cet_onnx.runner
from cet_onnx.allocation.probes import ProbeSession
from cet_onnx.calibration.data import batched
from cet_onnx.cli import main
from cet_onnx.errors import InputError
from cet_onnx.graph.weights import find_weights
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
#: set by tools/gpu_check.sh on a CUDA machine: the CUDA tests run (and fail) rather than skip
REQUIRE_CUDA = os.environ.get("CET_ONNX_REQUIRE_CUDA") == "1"
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA and not REQUIRE_CUDA, reason="onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu as README "
                         "'GPU (CUDA)' says; tools/gpu_check.sh runs these on a CUDA machine)")

#: CUDA with plain float32 matrix products (no TF32), so that the comparison with CPU tests the binding path,
#: not TF32's 10-bit mantissa; the command-line tests below run cet-onnx's own provider defaults
CUDA = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]
#: relative and absolute tolerance of a CUDA loss against the CPU loss (losses here are O(1e-3 … 1))
PROBE_RTOL = 0.02
PROBE_ATOL = 1e-5
#: formats compared between the devices (see the module docstring)
COMPARED_BITS = (2, 4)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _digits():
    model = onnx.load(DIGITS / "model.onnx")
    weights, _ = find_weights(model)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    images = np.load(DIGITS / "calib.npz")["image"][:48]
    batches = batched([{"image": images[i:i + 1]} for i in range(len(images))], 16)
    return model, weights, {w.name: values[w.name] for w in weights}, batches


def _session(providers, loss="logmse"):
    model, weights, values, batches = _digits()
    return ProbeSession(ir.from_proto(model), weights, values, None, batches, providers, loss, "logits"), weights


def _quantized(session, w, bits):
    return quantize_weight(session.values[w.name], WeightFormat(bits), w.channel_axis, w.reduction_axis).dequantize()


@pytest.fixture(scope="module")
def sessions():
    cpu, weights = _session(CPU)
    gpu, _ = _session(CUDA)
    return cpu, gpu, weights


@pytest.mark.cuda
@needs_cuda
def test_probe_session_runs_on_cuda(sessions):
    _, gpu, _ = sessions
    assert gpu.device == "cuda"
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    floats = getattr(gpu, "_float_values", {})  # the bound float weights, when the attribute is still so named
    for value in floats.values():
        assert value.device_name().lower() == "cuda"


@pytest.mark.cuda
@needs_cuda
def test_cuda_base_loss_and_probes_agree_with_cpu(sessions):
    cpu, gpu, weights = sessions
    assert cpu.device == "cpu"
    # the float model's own outputs: the same on both devices
    np.testing.assert_allclose(gpu.reference, cpu.reference, rtol=1e-3, atol=1e-4)
    # label-free loss at the float weights: zero on CPU, rounding noise on CUDA
    assert cpu.base_loss == pytest.approx(0.0, abs=1e-9)
    assert gpu.base_loss == pytest.approx(cpu.base_loss, abs=PROBE_ATOL)
    compared = 0
    for w in weights:
        for bits in COMPARED_BITS:
            q = _quantized(cpu, w, bits)
            rc, rg = cpu.probe(w.name, q, f"int{bits}"), gpu.probe(w.name, q, f"int{bits}")
            for field in ("loss_plus", "loss_minus", "predicted"):
                assert getattr(rg, field) == pytest.approx(getattr(rc, field), rel=PROBE_RTOL, abs=PROBE_ATOL), \
                    (w.name, bits, field)
            assert rg.delta_sq == pytest.approx(rc.delta_sq, rel=1e-6)
            if rc.loss_plus > 10 * PROBE_ATOL:
                compared += 1
    assert compared >= len(weights)  # the comparison is not all below the noise floor


@pytest.mark.cuda
@needs_cuda
def test_cuda_probe_rebinds_the_float_weight(sessions):
    _, gpu, weights = sessions
    before = gpu.outputs()
    w, other = weights[1], weights[-1]
    first = gpu.probe(other.name, _quantized(gpu, other, 2), "int2")
    r = gpu.probe(w.name, _quantized(gpu, w, 2), "int2")
    assert r.loss_plus > 100 * PROBE_ATOL  # the probe really perturbed the model on the device
    # no overrides: every batch sees the float weights again
    assert gpu.loss() == pytest.approx(gpu.base_loss, abs=1e-7)
    np.testing.assert_allclose(gpu.outputs(), before, rtol=1e-5, atol=1e-6)
    # an earlier probe of another weight left nothing behind
    again = gpu.probe(other.name, _quantized(gpu, other, 2), "int2")
    assert again.loss_plus == pytest.approx(first.loss_plus, rel=1e-5, abs=1e-8)
    # overriding two weights at once, then none
    both = gpu.loss({w.name: _quantized(gpu, w, 2), other.name: _quantized(gpu, other, 2)})
    assert both > r.loss_plus * 0.5
    assert gpu.loss() == pytest.approx(gpu.base_loss, abs=1e-7)


def _cpu_agreement(out: Path) -> float:
    """Top-1 agreement of ``out`` with the float model on the held-out digits, both on stock onnxruntime CPU."""
    x = np.load(DIGITS / "eval.npz")["image"]
    float_sess = ort.InferenceSession(str(DIGITS / "model.onnx"), providers=CPU)
    quant_sess = ort.InferenceSession(str(out), providers=CPU)
    a = float_sess.run(None, {"image": x})[0].argmax(1)
    b = quant_sess.run(None, {"image": x})[0].argmax(1)
    return float(np.mean(a == b))


def _session_gets_cuda() -> bool:
    """Whether onnxruntime really runs a session on CUDA here (it falls back to CPU when a CUDA library is missing)."""
    s = ort.InferenceSession(str(DIGITS / "model.onnx"), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return s.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["mixed", "int8"])
def test_quantize_device_cuda_digits(tmp_path, kind):
    # a uniform run's report names the device asked for, not the provider that ran: so check that
    # onnxruntime does give a session CUDA here
    assert _session_gets_cuda(), "CUDAExecutionProvider is listed but a session falls back to CPU"
    out = tmp_path / f"digits.{kind}.onnx"
    extra = ["--avg-bits", 3, "--probe-size", 32, "--fidelity-samples", 4, "--no-cache"] if kind == "mixed" else []
    res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz",
                 "--device", "cuda", "--json", "-q", *extra)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] and out.exists()
    saved = json.loads(out.with_name(f"digits.{kind}.report.json").read_text())
    assert saved["options"]["device"] == "cuda"
    if kind == "mixed":
        a = saved["allocation"]
        assert a["device"] == "cuda" and a["probe_runs"] > 0
        assert 2.5 < saved["totals"]["avg_bits"] <= 3.0 + 1e-9
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert _cpu_agreement(out) >= (0.9 if kind == "mixed" else 0.99)


@pytest.mark.cuda
def test_device_cuda_without_cuda_is_a_usage_error(tmp_path, monkeypatch):
    # runs everywhere: on a CUDA machine the provider is hidden from cet-onnx
    monkeypatch.setattr(cet_onnx.runner.ort, "get_available_providers", lambda: list(CPU))
    out = tmp_path / "q.onnx"
    res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz", "--device", "cuda")
    assert res.exit_code == 2, res.output
    assert "--device cuda" in res.output and "onnxruntime-gpu" in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
    res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz", "--device", "cuda",
                 "--json")
    assert res.exit_code == 2
    err = json.loads(res.stdout)
    assert err["ok"] is False and err["exit_code"] == 2 and "CUDA" in err["error"]


def test_listed_but_unusable_cuda_is_detected(monkeypatch, capsys):
    """onnxruntime can list CUDA and still run on the CPU (a CUDA library missing): never silently."""
    import cet_onnx.runner as runner
    if runner._cuda_starts():
        pytest.skip("CUDA really starts here")
    monkeypatch.setattr(runner.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *CPU])
    with pytest.raises(InputError, match="cannot start it"):
        runner.select_providers("cuda")
    assert runner.select_providers("auto") == list(CPU)
    assert "using the CPU" in capsys.readouterr().err
