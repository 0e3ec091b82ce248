"""QuantizeOptions: grouped, flat-compatible construction, the report's flat view, one validation step."""

import dataclasses

import pytest

from cet_onnx.errors import InputError
from cet_onnx.options import FLAT, AllocationOptions, QuantizeOptions, RunOptions, validate
from cet_onnx.pipeline import analyze, quantize


def test_flat_names_build_and_read_the_groups():
    opts = QuantizeOptions(device="cpu", verify_size=0, avg_bits=3, weight_bits=4, rounding="rtn")
    assert opts.run.device == "cpu" and opts.data.verify_size == 0 and opts.allocation.avg_bits == 3
    assert opts.weights.bits == 4 and opts.weight_rounding.method == "rtn"
    assert opts.device == "cpu" and opts.avg_bits == 3          # flat reads
    assert QuantizeOptions.of(device="cpu", verify_size=0, avg_bits=3, weight_bits=4, rounding="rtn") == opts


def test_groups_and_flat_names_combine():
    opts = QuantizeOptions(run=RunOptions(device="cpu", seed=5), allocation=AllocationOptions(allocator="hawq"),
                           seed=7)
    assert opts.run == RunOptions(device="cpu", seed=7) and opts.allocation.allocator == "hawq"


def test_replace_keeps_the_other_options():
    base = QuantizeOptions(device="cpu", rounding="major-axis", sequential=True, probe_size=16)
    for changed in (base.replace(allocator="sqnr", avg_bits=2.5),
                    dataclasses.replace(base, allocator="sqnr", avg_bits=2.5)):
        assert changed.allocation.allocator == "sqnr" and changed.allocation.avg_bits == 2.5
        assert changed.weight_rounding.sequential and changed.allocation.probe_size == 16
        assert changed.run.device == "cpu"
    assert base.allocation.allocator == "cet" and base.avg_bits is None


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="weight_bitz"):
        QuantizeOptions(weight_bitz=4)


def test_flat_view_has_the_earlier_field_order():
    flat = QuantizeOptions().flat()
    assert list(flat) == list(FLAT)
    assert list(flat)[:4] == ["weight_bits", "per_tensor", "block_size", "act_bits"]
    assert list(flat)[-9:] == ["refine_rounds", "probe_numerics", "workers", "ray", "reproducible", "probes", "act_mode",
                               "int8_full_range", "act_precision"]
    assert flat["bits"] == (2, 4, 8) and flat["candidate_block"] == (32, 128)


@pytest.mark.parametrize("flat, message", [
    (dict(avg_bits=3, max_loss=1.0), "only one of"),
    (dict(loss="l1"), "--loss must be one of kl, logmse, mse, cosine, ce"),
    (dict(act_mode="int8"), "--act-mode must be one of auto, static, dynamic, none, got 'int8'"),
    (dict(act_mode="static", weight_only=True), "--weight-only is --act-mode none"),
    (dict(loss="ce"), "--loss ce needs --labels"),
    (dict(allocator="greedy"), "--allocator must be one of"),
    (dict(rounding="gptq"), "--rounding must be auto, rtn or major-axis, got 'gptq'"),
    (dict(probe_numerics="int8"), "--probe-numerics must be float or deployed, got 'int8'"),
    (dict(device="tpu"), "--device must be auto, cpu or cuda, got 'tpu'"),
    (dict(calib_method="kl"), "--calib-method must be one of"),
    (dict(weight_clip="max"), "--weight-clip must be one of"),
    (dict(weight_grid="log"), "--weight-grid must be one of"),
    (dict(act_bits=4), "--act-bits must be one of 8, 16"),
    (dict(per_tensor=True, block_size=32), "--per-tensor and --block-size cannot be combined"),
    (dict(workers=0), "--workers must be a whole number of at least 1, got '0'"),
    (dict(workers=2.5), "--workers must be a whole number of at least 1, got '2.5'"),
    (dict(ray=""), "--ray must be auto or a Ray cluster address, got ''"),
    (dict(ray=3), "--ray must be auto or a Ray cluster address, got '3'"),
])
def test_every_option_is_checked_before_any_work(tmp_path, flat, message):
    opts = QuantizeOptions(**flat)
    with pytest.raises(InputError, match=message):
        validate(opts)
    missing = tmp_path / "missing.onnx"      # validation comes first: the missing model is never read
    with pytest.raises(InputError, match=message):
        quantize(missing, tmp_path / "out.onnx", None, opts)
    with pytest.raises(InputError, match=message):
        analyze(missing, None, opts)


def test_defaults_are_valid():
    validate(QuantizeOptions())
