"""Tests for cet_onnx.calibration.data: every source kind, batching and every input error."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from cet_onnx.calibration.data import (
    ImageOptions,
    ModelInput,
    batched,
    conform_feed,
    load_samples,
    model_inputs,
    run_reason,
    validate_feed,
)
from cet_onnx.errors import InputError

# --------------------------------------------------------------------------- tiny models


def _identity_model(inputs: list[tuple[str, int, list]]) -> ir.Model:
    """A model passing each input straight to an output (shapes/dtypes are what matter)."""
    graph_inputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    outputs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    return ir.from_proto(helper.make_model(helper.make_graph(nodes, "g", graph_inputs, outputs)))


def _image_inputs(shape=("N", 1, 8, 8)) -> list[ModelInput]:
    return model_inputs(_identity_model([("image", TensorProto.FLOAT, list(shape))]))


def _two_inputs() -> list[ModelInput]:
    return model_inputs(_identity_model([("x", TensorProto.FLOAT, ["N", 4]),
                                         ("ids", TensorProto.INT64, ["N", 3])]))


def _error(fn, *args, **kwargs) -> str:
    """Run fn expecting InputError; return its message after checking it is one line."""
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def _rand(*shape, dtype=np.float32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------- model_inputs


def test_model_inputs_reads_names_dtypes_shapes_and_skips_initializers():
    model = _identity_model([("x", TensorProto.FLOAT, ["N", 4]),
                             ("ids", TensorProto.INT64, [None, 3])])
    weight = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]),
                      const_value=ir.tensor(np.zeros(4, np.float32), name="w"))
    model.graph.register_initializer(weight)
    model.graph.inputs.append(weight)
    got = model_inputs(model)
    assert got == [ModelInput("x", np.dtype(np.float32), ("N", 4)),
                   ModelInput("ids", np.dtype(np.int64), (None, 3))]


def test_model_inputs_unknown_rank():
    model = _identity_model([("x", TensorProto.FLOAT, None)])
    (inp,) = model_inputs(model)
    assert inp.rank_known is False and inp.shape == ()


# --------------------------------------------------------------------------- (a) directory of .npy/.npz


def test_npy_directory_sorted_with_and_without_batch_axis(tmp_path):
    a, b = _rand(3, 1, 8, 8, dtype=np.float64), _rand(1, 8, 8, seed=1)
    np.save(tmp_path / "b.npy", b)  # one sample without batch axis
    np.save(tmp_path / "a.npy", a)  # three samples, float64 -> cast
    (tmp_path / "notes.txt").write_text("ignored")
    samples = load_samples(str(tmp_path), _image_inputs())
    assert len(samples) == 4
    for s in samples:
        assert list(s) == ["image"]
        assert s["image"].shape == (1, 1, 8, 8) and s["image"].dtype == np.float32
    np.testing.assert_allclose(samples[0]["image"][0], a[0].astype(np.float32))
    np.testing.assert_allclose(samples[3]["image"][0], b)


def test_npz_directory_two_inputs_and_int_width_cast(tmp_path):
    for i in range(2):
        np.savez(tmp_path / f"f{i}.npz", x=_rand(2, 4, seed=i),
                 ids=np.arange(6, dtype=np.int32).reshape(2, 3) + i)
    samples = load_samples(str(tmp_path), _two_inputs())
    assert len(samples) == 4
    assert samples[0]["x"].shape == (1, 4) and samples[0]["ids"].dtype == np.int64
    np.testing.assert_array_equal(samples[3]["ids"], [[4, 5, 6]])


def test_limit_stops_reading_later_files(tmp_path):
    np.save(tmp_path / "a.npy", _rand(3, 1, 8, 8))
    (tmp_path / "b.npy").write_bytes(b"corrupt, but never opened")
    assert len(load_samples(str(tmp_path), _image_inputs(), limit=2)) == 2


# --------------------------------------------------------------------------- (b) single .npz


def test_single_npz_and_limit(tmp_path):
    path = tmp_path / "calib.npz"
    x, ids = _rand(5, 4), np.arange(15).reshape(5, 3)
    np.savez(path, x=x, ids=ids)
    samples = load_samples(str(path), _two_inputs())
    assert len(samples) == 5
    np.testing.assert_array_equal(np.concatenate([s["x"] for s in samples]), x)
    first2 = load_samples(str(path), _two_inputs(), limit=2)
    assert len(first2) == 2 and first2[1]["ids"].tolist() == [[3, 4, 5]]


def test_single_npy_file(tmp_path):
    np.save(tmp_path / "x.npy", _rand(2, 1, 8, 8))
    assert len(load_samples(str(tmp_path / "x.npy"), _image_inputs())) == 2


# --------------------------------------------------------------------------- (c) images


def _write_images(folder: Path, colours: list[tuple[int, int, int]], size=(12, 16)) -> None:
    from PIL import Image
    folder.mkdir(exist_ok=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (size[1], size[0]), colour).save(folder / f"img{i}.png")


def test_images_rgb_nchw_resized_and_normalised(tmp_path):
    pytest.importorskip("PIL")
    _write_images(tmp_path / "imgs", [(255, 0, 51), (0, 255, 0)])
    options = ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    samples = load_samples(str(tmp_path / "imgs"), _image_inputs(("N", 3, 8, 8)), image=options)
    assert len(samples) == 2
    img = samples[0]["image"]
    assert img.shape == (1, 3, 8, 8) and img.dtype == np.float32
    np.testing.assert_allclose(img[0, :, 0, 0], [1.0, -2.0, (0.2 - 0.5) / 0.5], atol=1e-6)


def test_images_nhwc_grayscale_from_model_and_explicit_size(tmp_path):
    pytest.importorskip("PIL")
    _write_images(tmp_path / "imgs", [(255, 255, 255)])
    inputs = _image_inputs(("N", "H", "W", 1))
    message = _error(load_samples, str(tmp_path / "imgs"), inputs, image=ImageOptions(layout="NHWC"))
    assert "--image-size" in message and "'image'" in message
    samples = load_samples(str(tmp_path / "imgs"), inputs,
                           image=ImageOptions(size=(6, 5), layout="NHWC"))
    assert samples[0]["image"].shape == (1, 6, 5, 1)
    np.testing.assert_allclose(samples[0]["image"], 1.0, atol=1e-6)


def test_images_errors(tmp_path):
    pytest.importorskip("PIL")
    _write_images(tmp_path / "imgs", [(1, 2, 3)])
    message = _error(load_samples, str(tmp_path / "imgs"), _two_inputs())
    assert "single-input" in message
    (tmp_path / "imgs" / "zz_bad.jpg").write_bytes(b"not an image")
    message = _error(load_samples, str(tmp_path / "imgs"), _image_inputs(("N", 3, 8, 8)))
    assert "zz_bad.jpg" in message
    (tmp_path / "mixed").mkdir()
    _write_images(tmp_path / "mixed", [(1, 2, 3)])
    np.save(tmp_path / "mixed" / "a.npy", _rand(1, 3, 8, 8))
    assert "mixes" in _error(load_samples, str(tmp_path / "mixed"), _image_inputs(("N", 3, 8, 8)))


def test_images_without_pillow(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "PIL", None)
    message = _error(load_samples, str(tmp_path / "imgs"), _image_inputs(("N", 3, 8, 8)))
    assert "pip install pillow" in message


# --------------------------------------------------------------------------- (d) module:callable

READER_MODULE = '''
import numpy as np

def batches():
    for i in range(2):
        yield {"image": np.full((3, 1, 8, 8), i, dtype=np.float64)}

class Reader:
    """Like onnxruntime's CalibrationDataReader."""
    def __init__(self):
        self.items = iter([{"image": np.zeros((1, 8, 8), np.float32)}] * 2)
    def get_next(self):
        return next(self.items, None)

reader_instance = Reader()
as_list = [{"image": np.ones((2, 1, 8, 8), np.float32)}]

def broken():
    raise RuntimeError("disk on fire")

def not_dicts():
    return [1, 2]

def wrong_input():
    return [{"img": np.zeros((1, 1, 8, 8), np.float32)}]
'''


@pytest.fixture
def reader_module(tmp_path, monkeypatch):
    """A user module importable by name from the cwd; unique name per test."""
    name = f"calib_reader_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(READER_MODULE))
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("attr,count", [("batches", 6), ("Reader", 2),
                                        ("reader_instance", 2), ("as_list", 2)])
def test_callable_sources(reader_module, attr, count):
    samples = load_samples(f"{reader_module}:{attr}", _image_inputs())
    assert len(samples) == count
    assert all(s["image"].shape == (1, 1, 8, 8) and s["image"].dtype == np.float32
               for s in samples)


def test_callable_limit_counts_samples_and_file_path(reader_module, tmp_path):
    samples = load_samples(f"{reader_module}:batches", _image_inputs(), limit=4)
    assert [float(s["image"].max()) for s in samples] == [0, 0, 0, 1]
    by_path = load_samples(f"{tmp_path}/{reader_module}.py:batches", _image_inputs())
    assert len(by_path) == 6


def test_callable_errors(reader_module):
    inputs = _image_inputs()
    message = _error(load_samples, "no_such_module_xyz:fn", inputs)
    assert "no_such_module_xyz" in message and "ModuleNotFoundError" in message
    message = _error(load_samples, f"{reader_module}:missing", inputs)
    assert reader_module in message and "'missing'" in message
    assert "disk on fire" in _error(load_samples, f"{reader_module}:broken", inputs)
    assert "expected a dict" in _error(load_samples, f"{reader_module}:not_dicts", inputs)
    message = _error(load_samples, f"{reader_module}:wrong_input", inputs)
    assert "unknown input 'img'" in message and "item 0" in message
    assert "no such file" in _error(load_samples, "nowhere/data.py:fn", inputs)


# --------------------------------------------------------------------------- (e) random data


def test_random_data_shapes_dtypes_seed_and_warning(capsys):
    inputs = model_inputs(_identity_model([("x", TensorProto.FLOAT16, ["N", "T", 4]),
                                           ("ids", TensorProto.INT64, ["N", 3]),
                                           ("mask", TensorProto.BOOL, [1, 3])]))
    samples = load_samples(None, inputs)
    err = capsys.readouterr().err
    assert "WARNING:" in err and "RANDOM" in err and "x[N,T,4]" in err
    assert len(samples) == 8
    s = samples[0]
    assert s["x"].shape == (1, 1, 4) and s["x"].dtype == np.float16
    assert s["mask"].dtype == np.bool_ and s["mask"].shape == (1, 3)
    ids = np.concatenate([t["ids"] for t in samples])
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 10
    again = load_samples(None, inputs, limit=3)
    assert len(again) == 3 and np.array_equal(again[2]["ids"], samples[2]["ids"])
    other = load_samples(None, inputs, seed=1, limit=1)
    assert not np.array_equal(other[0]["x"], samples[0]["x"])


# --------------------------------------------------------------------------- batched


def test_batched_concatenates_and_keeps_last_partial():
    samples = [{"x": np.full((1, 4), i, np.float32), "ids": np.full((1, 3), i)} for i in range(5)]
    batches = batched(samples, 2)
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(batches[1]["ids"][:, 0], [2, 3])
    assert batched(samples, 1)[4]["x"][0, 0] == 4
    assert len(batched(samples, 2, inputs=_two_inputs())) == 3


def test_batched_fixed_batch_and_shape_errors():
    inputs = _image_inputs((2, 1, 8, 8))
    samples = [{"image": np.zeros((1, 1, 8, 8), np.float32)} for _ in range(5)]
    assert "fixed at 2" in _error(batched, samples, 4, inputs=inputs)
    batches = batched(samples, 2, inputs=inputs)
    assert [b["image"].shape[0] for b in batches] == [2, 2]  # partial batch dropped
    ragged = [{"t": np.zeros((1, n), np.float32)} for n in (3, 4)]
    assert "batch size 1" in _error(batched, ragged, 2)
    assert _error(batched, samples, 0)


# --------------------------------------------------------------------------- error messages


def test_unknown_missing_and_shape_messages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inputs = _image_inputs()
    np.savez("calib.npz", img=_rand(4, 1, 8, 8))
    assert _error(load_samples, "calib.npz", inputs) == \
        "calibration data 'calib.npz': unknown input 'img' (model inputs: image)"
    np.savez("two.npz", x=_rand(2, 4))
    assert "calibration data 'two.npz': missing input 'ids'" in \
        _error(load_samples, "two.npz", _two_inputs())
    np.savez("x.npz", image=_rand(4, 3, 8, 8))
    assert _error(load_samples, "x.npz", inputs) == (
        "calibration data 'x.npz': input 'image' expects shape [N,1,8,8] (float32), "
        "got [4,3,8,8]")
    np.save("rank.npy", _rand(8, 8))
    assert "got [8,8]" in _error(load_samples, "rank.npy", inputs)


@pytest.mark.parametrize("arrays,needle", [
    ({"x": _rand(2, 4), "ids": _rand(2, 3)}, "'ids' expects int64, got float32"),
    ({"x": np.ones((2, 4), np.int64), "ids": np.ones((2, 3), np.int64)}, "'x' expects float32, got int64"),
    ({"x": np.ones((2, 4), bool), "ids": np.ones((2, 3), np.int64)}, "'x' expects float32, got bool"),
    ({"x": np.array([[1, np.nan, 0, 0]] * 2), "ids": np.ones((2, 3), np.int64)}, "'x' contains NaN or Inf"),
    ({"x": np.full((2, 4), np.inf), "ids": np.ones((2, 3), np.int64)}, "'x' contains NaN or Inf"),
    ({"x": np.full((2, 4), 1e300), "ids": np.ones((2, 3), np.int64)}, "'x' contains NaN or Inf"),
    ({"x": _rand(2, 4), "ids": np.full((2, 3), 2**40, np.uint64) * 2**23},
     "'ids' expects int64, got uint64 with values outside"),
    ({"x": _rand(2, 4), "ids": np.ones((3, 3), np.int64)}, "disagree on the number of samples"),
    ({"x": np.array([["a"] * 4] * 2), "ids": np.ones((2, 3), np.int64)}, "(non-numeric)"),
])
def test_bad_arrays_name_file_and_input(tmp_path, arrays, needle):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    message = _error(load_samples, str(path), _two_inputs())
    assert f"calibration data '{path}'" in message and needle in message


def test_unreadable_and_empty_sources(tmp_path):
    inputs = _image_inputs()
    np.savez(tmp_path / "obj.npz", image=np.array([{"a": 1}, None], dtype=object))
    message = _error(load_samples, str(tmp_path / "obj.npz"), inputs)
    assert "obj.npz" in message and "pickle" in message.lower()
    np.save(tmp_path / "obj.npy", np.array([1, "x", None], dtype=object), allow_pickle=True)
    assert "obj.npy" in _error(load_samples, str(tmp_path / "obj.npy"), inputs)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 garbage")
    assert "corrupt.npz" in _error(load_samples, str(tmp_path / "corrupt.npz"), inputs)
    (tmp_path / "text.npy").write_text("1,2,3")
    assert "text.npy" in _error(load_samples, str(tmp_path / "text.npy"), inputs)
    (tmp_path / "empty").mkdir()
    assert "no .npy" in _error(load_samples, str(tmp_path / "empty"), inputs)
    (tmp_path / "zero").mkdir()
    np.save(tmp_path / "zero" / "a.npy", np.zeros((0, 1, 8, 8), np.float32))
    assert "no samples" in _error(load_samples, str(tmp_path / "zero"), inputs)
    assert "no such file" in _error(load_samples, str(tmp_path / "missing.npz"), inputs)
    (tmp_path / "data.csv").write_text("1")
    assert "unsupported file type" in _error(load_samples, str(tmp_path / "data.csv"), inputs)
    np.save(tmp_path / "one.npy", _rand(1, 4))
    assert "single-input" in _error(load_samples, str(tmp_path / "one.npy"), _two_inputs())
    assert _error(load_samples, str(tmp_path / "one.npy"), inputs, limit=0)


def test_scalar_inputs_make_every_feed_one_run(tmp_path):
    inputs = model_inputs(_identity_model([("x", TensorProto.FLOAT, ["N", 4]), ("s", TensorProto.INT64, [])]))
    assert run_reason(inputs) == "input 's' is a scalar"
    for k in range(3):
        np.savez(tmp_path / f"run{k}.npz", x=_rand(k + 1, 4), s=np.int64(16000))
    samples = load_samples(str(tmp_path), inputs)
    assert [s["x"].shape for s in samples] == [(1, 4), (2, 4), (3, 4)] and samples[0]["s"].shape == ()
    assert batched(samples, 16, inputs=inputs) == samples   # runs are never stacked
    assert len(load_samples(str(tmp_path), inputs, limit=2)) == 2
    np.savez(tmp_path / "run3.npz", x=_rand(4), s=np.int64(1))
    assert "expects shape [N,4] (float32) in each run's feed, got [4]" in _error(load_samples, str(tmp_path), inputs)


def test_a_state_with_its_batch_on_axis_1_makes_feeds_runs():
    state = model_inputs(_identity_model([("x", TensorProto.FLOAT, ["batch", 8]),
                                          ("state", TensorProto.FLOAT, [2, "batch", 4])]))
    assert run_reason(state) == "input 'state' has a fixed first dimension (2) and input 'x' a dynamic one"
    named = model_inputs(_identity_model([("x", TensorProto.FLOAT, ["batch", 8]),
                                          ("h", TensorProto.FLOAT, ["layers", "batch", 4])]))
    assert run_reason(named) == "the batch dimension 'batch' is axis 1 of input 'h'"
    assert run_reason(model_inputs(_identity_model([("x", TensorProto.FLOAT, ["N", 8]),
                                                    ("m", TensorProto.INT64, ["N", 8])]))) is None
    seq = model_inputs(_identity_model([("x", TensorProto.FLOAT, [40, "N", 8])]))
    assert run_reason(seq).startswith("input 'x' has a fixed first dimension (40) and a dynamic one at axis 1")
    assert run_reason(model_inputs(_identity_model([("img", TensorProto.FLOAT, [1, 3, "H", "W"])]))) is None
    samples = load_samples(None, state, limit=2)
    assert samples[0]["state"].shape == (2, 1, 4) and samples[0]["x"].shape == (1, 8)


def test_a_stateful_reader_feeds_each_run_the_previous_runs_state(tmp_path):
    """The README's recipe: a reader that runs the float model itself to carry the state."""
    reader = tmp_path / "stream_reader.py"
    reader.write_text(textwrap.dedent("""
        import numpy as np

        class Stream:
            def __init__(self):
                self.k, self.state = 0, np.zeros((2, 1, 4), np.float32)

            def get_next(self):
                if self.k == 3:
                    return None
                feed = {"x": np.full((1, 8), self.k, np.float32), "state": self.state}
                self.state = self.state + 1      # what the model's stateN output would be
                self.k += 1
                return feed
    """))
    inputs = model_inputs(_identity_model([("x", TensorProto.FLOAT, ["batch", 8]),
                                           ("state", TensorProto.FLOAT, [2, "batch", 4])]))
    samples = load_samples(f"{reader}:Stream", inputs)
    assert [float(s["state"].mean()) for s in samples] == [0.0, 1.0, 2.0]


def test_fixed_inputs_may_be_left_out_of_the_data_or_must_hold_the_value(tmp_path):
    model = _identity_model([("x", TensorProto.FLOAT, ["N", 4]), ("sr", TensorProto.INT64, [])])
    x_only, sr = model_inputs(model)[:1], model_inputs(model)[1]
    fixed = {"sr": (sr, np.array(16000, np.int64))}
    np.savez(tmp_path / "a.npz", x=_rand(3, 4), sr=np.int64(16000))
    np.savez(tmp_path / "b.npz", x=_rand(2, 4))
    samples = load_samples(str(tmp_path), x_only, fixed=fixed)
    assert [sorted(s) for s in samples] == [["x"], ["x"]]
    np.savez(tmp_path / "c.npz", x=_rand(2, 4), sr=np.int64(8000))
    assert "input 'sr' is fixed to 16000 by --fix-input, but the data gives [8000]" in _error(
        load_samples, str(tmp_path), x_only, fixed=fixed)


# --------------------------------------------------------------------------- validate/conform


def test_validate_feed_is_strict_and_conform_feed_casts():
    inputs = _image_inputs((1, 1, 8, 8))
    raw = {"image": np.zeros((1, 8, 8))}  # float64, no batch axis
    message = _error(validate_feed, raw, inputs, "feed")
    assert "'image'" in message and "expects float32, got float64" in message
    feed = conform_feed(raw, inputs, "feed")
    validate_feed(feed, inputs, "feed", exact_batch=True)
    two = {"image": np.zeros((2, 1, 8, 8), np.float32)}
    validate_feed(two, inputs, "feed")  # axis 0 is free for samples
    assert "expects shape [1,1,8,8]" in _error(validate_feed, two, inputs, "feed", exact_batch=True)
