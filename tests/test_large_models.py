"""Large models: weights stay on disk (external data read when needed), same result as in memory.

The on-disk path normally starts at ``external_data.LAZY_BYTES`` (1 GiB); these tests lower
the threshold so the bundled digits model, saved with external data, takes it. The peak
memory on a real 2.5 GB model is measured by ``tools/large_model_memory.py``.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from cet_onnx.io import external_data
from cet_onnx.cli import main
from cet_onnx.errors import InputError
from cet_onnx.graph.prepare import prepare_model
from cet_onnx.io.load import load_model
from cet_onnx.allocation.cache import cache_key

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def external_digits(tmp_path) -> Path:
    """The digits model with every initializer (biases too) in ``model.onnx.data``."""
    folder = tmp_path / "ext"
    folder.mkdir()
    m = onnx.load(str(DIGITS / "model.onnx"))
    onnx.save_model(m, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    return folder / "model.onnx"


def test_large_model_keeps_its_weights_on_disk(external_digits, monkeypatch):
    eager = load_model(external_digits)
    assert not external_data.external_tensors(eager)
    monkeypatch.setattr(external_data, "LAZY_BYTES", 0)
    lazy = prepare_model(external_digits)          # onnxsim is skipped with a warning on this path
    tensors = {name: v.const_value for name, v in lazy.graph.initializers.items()}
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors.values())
    values = external_data.LazyValues(tensors)
    for name, v in eager.graph.initializers.items():
        got = values[name]
        assert not got.flags.writeable and not got.flags.owndata   # a read-only view of the file
        np.testing.assert_array_equal(got, v.const_value.numpy().astype(np.float32))


@pytest.mark.parametrize("args", [
    ("--weight-bits", 8),
    ("--weight-bits", 4, "--block-size", 32),                       # major-axis rounding: Hessians in chunks
    ("--weight-bits", 4, "--block-size", 32, "--sequential"),
    ("--avg-bits", 3, "--probe-size", 32, "--fidelity-samples", 3, "--refine-rounds", 1),
    ("--avg-bits", 3, "--probe-size", 32, "--fidelity-samples", 2, "--refine-rounds", 1, "--workers", 2),
], ids=["int8", "int4-major-axis", "int4-sequential", "mixed", "mixed-workers"])
def test_on_disk_run_is_byte_identical_to_in_memory_run(external_digits, tmp_path, monkeypatch, args):
    from cet_onnx.allocation import probes
    monkeypatch.setattr(probes, "REBUILD_MAX_BYTES", 0)   # both bind the weights (see test_probes_rebuilt_...)
    outs = []
    for lazy in (False, True):
        monkeypatch.setattr(external_data, "LAZY_BYTES", 0 if lazy else 2**62)
        out = tmp_path / f"q{int(lazy)}" / "q.onnx"
        out.parent.mkdir()
        # --act-precision uniform: a model whose weights stay on disk skips the activation plan's check (it would
        # hold the model twice), so both runs are pinned to what that path writes
        res = invoke("quantize", external_digits, "-o", out, "--calib", DIGITS / "calib.npz", "--calib-size", 96,
                     "--no-simplify", "--reproducible", "--cache-dir", tmp_path / f"cache{int(lazy)}", "-q",
                     "--act-precision", "uniform", *args)
        assert res.exit_code == 0, res.output
        report = json.loads(out.with_name("q.report.json").read_text())
        report.pop("model"), report.pop("output"), report["options"].pop("cache_dir")
        outs.append((out.read_bytes(), report))
        # the output is self-contained: no external data files, loads from its bytes alone
        assert {p.name for p in out.parent.iterdir()} - {"q.pareto.png"} == {"q.onnx", "q.report.json"}
    assert outs[0][0] == outs[1][0]
    assert outs[0][1] == outs[1][1]


def test_truncated_external_data_is_a_clear_error(external_digits, monkeypatch):
    data = external_digits.with_name("model.onnx.data")
    data.write_bytes(data.read_bytes()[:1000])
    for threshold in (0, 2**62):
        monkeypatch.setattr(external_data, "LAZY_BYTES", threshold)
        with pytest.raises(InputError, match=r"tensor '.*'.*outside"):
            load_model(external_digits)
    res = CliRunner().invoke(main, ["quantize", str(external_digits), "-o", str(external_digits.with_name("q.onnx"))])
    assert res.exit_code == 2
    assert "model.onnx.data" in res.output and "Traceback" not in res.output
    assert not external_digits.with_name("q.onnx").exists()


def test_probe_cache_key_covers_external_weight_bytes(external_digits, tmp_path, monkeypatch):
    monkeypatch.setattr(external_data, "LAZY_BYTES", 0)
    batches = [{"input": np.zeros((2, 1, 28, 28), np.float32)}]
    key = cache_key(load_model(external_digits), batches, {"a": 1}, None)
    copy = tmp_path / "copy"
    shutil.copytree(external_digits.parent, copy)
    assert cache_key(load_model(copy / "model.onnx"), batches, {"a": 1}, None) == key   # same bytes elsewhere
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF                                                      # one weight byte changed
    data.write_bytes(bytes(raw))
    assert cache_key(load_model(copy / "model.onnx"), batches, {"a": 1}, None) != key


def test_hessians_in_chunks_give_the_same_model(tmp_path, monkeypatch):
    """A Hessian budget smaller than one layer: one pass per layer, same codes as one pass for all."""
    from cet_onnx.rounding import plan
    outs = []
    for budget in (2**62, 1):
        monkeypatch.setattr(plan, "HESSIAN_BYTES", budget)
        out = tmp_path / f"q{budget}.onnx"
        res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz",
                     "--calib-size", 96, "--weight-bits", 4, "--block-size", 32, "--reproducible", "-q")
        assert res.exit_code == 0, res.output
        report = json.loads(out.with_name(out.stem + ".report.json").read_text())
        assert report["rounding"]["method"] == "major-axis"
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_large_unchanged_initializers_are_streamed_into_the_output_data_file(tmp_path, monkeypatch):
    """A table looked up along axis 1 (not a weight: stays float) stays on disk and is copied to OUT.data chunk by chunk."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(3)
    table = numpy_helper.from_array(rng.normal(size=(32, 500)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.normal(size=(32, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["et"], axis=1), helper.make_node("Transpose", ["et"], ["e"]),
             helper.make_node("MatMul", ["e", "w"], ["y"])]
    g = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [table, w])
    folder = tmp_path / "in"
    folder.mkdir()
    model = folder / "m.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(model),
                    save_as_external_data=True, location="m.data", size_threshold=0)
    data = tmp_path / "ids.npz"
    np.savez(data, ids=rng.integers(0, 500, 64))
    outs = {}
    for lazy in (False, True):
        monkeypatch.setattr(external_data, "LAZY_BYTES", 0 if lazy else 2**62)
        monkeypatch.setattr(external_data, "STREAM_BYTES", 0)
        out = tmp_path / f"out{int(lazy)}" / "q.onnx"
        out.parent.mkdir()
        res = invoke("quantize", model, "-o", out, "--calib", data, "--no-simplify", "-q",
                     "--act-precision", "uniform")   # as above: the on-disk path skips the activation plan
        assert res.exit_code == 0, res.output
        files = {p.name for p in out.parent.iterdir()}
        assert files == ({"q.onnx", "q.report.json", "q.onnx.data"} if lazy else {"q.onnx", "q.report.json"})
        import onnxruntime as ort
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        outs[lazy] = sess.run(None, {"ids": np.arange(0, 500, 7)})[0]
        if lazy:
            q = onnx.load(str(out), load_external_data=False)
            streamed = {t.name for t in q.graph.initializer if onnx.external_data_helper.uses_external_data(t)}
            assert streamed == {"table"}   # the quantized weight (256 B) is small enough to stay inline
    np.testing.assert_array_equal(outs[False], outs[True])


@pytest.mark.parametrize("lazy", [False, True], ids=["in-memory", "on-disk"])
def test_external_data_shorter_than_the_tensor_is_a_clear_error(tmp_path, monkeypatch, lazy):
    """A ``length`` entry too small for the tensor's shape: exit 2, the tensor named, no output."""
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((16, 8), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w])
    model = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(model),
                    save_as_external_data=True, location="m.data", size_threshold=0)
    m = onnx.load(str(model), load_external_data=False)
    next(e for e in m.graph.initializer[0].external_data if e.key == "length").value = "100"
    onnx.save(m, str(model))
    monkeypatch.setattr(external_data, "LAZY_BYTES", 0 if lazy else 2**62)
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, ["quantize", str(model), "-o", str(out), "-q"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "w" in lines[0] and "Traceback" not in res.output
    assert not out.exists() and not out.with_name("q.report.json").exists()


def test_mixed_run_with_hessians_in_chunks_gives_the_same_model(tmp_path, monkeypatch):
    """Mixed precision whose layer Hessians do not fit at once: collected, used for every candidate
    format and dropped chunk by chunk (one layer per chunk here), same model as holding them all."""
    from cet_onnx.allocation import stage
    from cet_onnx.rounding import plan
    chunks = []
    monkeypatch.setattr(stage, "prepare_major_axis",
                        lambda p, opts, only, **kw: (chunks.append(only), plan.prepare_major_axis(p, opts, only=only, **kw)))
    outs = []
    for chunked in (False, True):
        monkeypatch.setattr(plan, "HESSIAN_MIN_BYTES", 0 if chunked else 2**62)
        monkeypatch.setattr(plan, "HESSIAN_BYTES", 1 if chunked else 2**62)
        out = tmp_path / f"q{int(chunked)}.onnx"
        res = invoke("quantize", DIGITS / "model.onnx", "-o", out, "--calib", DIGITS / "calib.npz",
                     "--calib-size", 96, "--avg-bits", 3, "--probe-size", 32, "--fidelity-samples", 2,
                     "--refine-rounds", 1, "--reproducible", "--no-cache", "-q")
        assert res.exit_code == 0, res.output
        report = json.loads(out.with_name(out.stem + ".report.json").read_text())
        assert report["rounding"]["method"] == "major-axis"
        assert len(chunks) == (len(report["weights"]) if chunked else 0)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
