"""Parallel probes (--workers, --ray): the same allocation as the serial run, and clear failures."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cet_onnx.allocation import parallel, stage
from cet_onnx.cli import main
from cet_onnx.errors import RuntimeFailure
from cet_onnx.options import QuantizeOptions
from cet_onnx.pipeline import prepare

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"
FAST = ("--avg-bits", 3, "--reproducible", "--no-cache", "--probe-size", 32, "--fidelity-samples", 2, "-q")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _quantize(out: Path, *extra) -> tuple[bytes, dict]:
    out.parent.mkdir(parents=True, exist_ok=True)
    res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz", *FAST, *extra)
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_name("q.report.json").read_text())
    report.pop("output")
    return out.read_bytes(), report


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    return _quantize(tmp_path_factory.mktemp("serial") / "q.onnx")


def test_workers_give_the_serial_model_and_report(serial, tmp_path):
    model, report = _quantize(tmp_path / "q.onnx", "--workers", 2)
    assert model == serial[0]
    assert report["options"].pop("workers") == 2 and serial[1]["options"]["workers"] is None
    assert report == {**serial[1], "options": {k: v for k, v in serial[1]["options"].items() if k != "workers"}}


def _digits_session(**flat):
    opts = QuantizeOptions(avg_bits=3, probe_size=32, device="cpu", **flat)
    p = prepare(DIGITS / "model.onnx", str(DIGITS / "calib.npz"), opts, mixed=True)
    session, info = stage.probe_session(p, opts)
    return p, opts, session, info


@pytest.fixture(scope="module")
def digits():
    return _digits_session()


def test_sqnr_probes_in_workers_match_serial(digits):
    from cet_onnx.allocation.allocate import measure_sqnr
    p, opts, session, _ = digits
    cand = stage.candidates(p, opts)
    serial = measure_sqnr(session, cand)
    with parallel.probe_pool(p, opts.replace(workers=2).allocation, session) as pool:
        par = measure_sqnr(session, cand, pool)
    np.testing.assert_array_equal(par.costs, serial.costs)
    assert par.runs == serial.runs


def test_cache_key_does_not_depend_on_workers_or_ray(digits):
    p, opts, session, info = digits
    cand = stage.candidates(p, opts)
    keys = {json.dumps(stage._cache_settings(p, o, cand, "cet", info), sort_keys=True)
            for o in (opts, opts.replace(workers=3), opts.replace(workers=2, ray="auto"))}
    assert len(keys) == 1


def test_a_worker_that_cannot_start_is_a_one_line_error(tmp_path, monkeypatch):
    broken = parallel.SessionSpec.of

    def garbage_model(model, session, threads=0):
        spec = broken(model, session, threads)
        spec.model = b"not an onnx model"
        return spec

    monkeypatch.setattr(parallel.SessionSpec, "of", staticmethod(garbage_model))
    out = tmp_path / "q.onnx"
    res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz", *FAST,
                 "--workers", 2)
    assert res.exit_code == 1
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: a probe worker could not build its session") and "Traceback" not in res.stderr
    assert not out.exists() and not out.with_name("q.report.json").exists()


def test_a_worker_that_dies_is_a_runtime_failure(digits):
    p, opts, session, _ = digits
    cand = stage.candidates(p, opts)
    w = cand.weights[0]
    jobs = [(w.name, cand.quantize(0, j).dequantize(), cand.formats[j].label)
            for j in range(len(cand.formats)) if cand.available[0, j]] * 4
    with parallel.probe_pool(p, opts.replace(workers=2).allocation, session) as pool:
        results = pool.map(session, "probe", jobs)
        next(results)
        for proc in list(pool._pool._processes.values()):
            os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(RuntimeFailure, match="probe worker process died"):
            list(results)


def test_a_failing_probe_names_the_weight(digits):
    p, opts, session, _ = digits
    with parallel.probe_pool(p, opts.replace(workers=2).allocation, session) as pool:
        with pytest.raises(RuntimeFailure, match=r"probe worker failed on probe of 'nope'"):
            list(pool.map(session, "probe", [("nope", np.zeros(3, np.float32), "int4/ch")]))


def test_ray_without_ray_installed_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(parallel, "ray_available", lambda: False)
    res = invoke("quantize", DIGITS / "model.onnx", "-o", tmp_path / "q.onnx", "--calib", DIGITS / "calib.npz",
                 *FAST, "--ray", "auto")
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: --ray needs Ray, which is not installed: pip install 'cet-onnx[ray]'"


@pytest.mark.ray
def test_ray_gives_the_serial_allocation(serial, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}})
    try:
        model, report = _quantize(tmp_path / "q.onnx", "--ray", "auto")
    finally:
        ray.shutdown()
    assert model == serial[0]
    options = report.pop("options")
    assert options.pop("ray") == "auto" and options == {k: v for k, v in serial[1]["options"].items() if k != "ray"}
    assert report == {k: v for k, v in serial[1].items() if k != "options"}


@pytest.mark.ray
def test_ray_address_nobody_listens_on_fails_fast(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "q.onnx"
    res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz", *FAST,
                 "--ray", "127.0.0.1:1")
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: --ray 127.0.0.1:1: no Ray cluster reachable there")
    assert not out.exists()
