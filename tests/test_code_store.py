"""Candidate codes kept in memory or on disk: the same weights come back, and the folder goes away."""

from pathlib import Path

import numpy as np

from cet_onnx.allocation.codes import CodeStore
from cet_onnx.quant.quantizer import WeightFormat, quantize_weight


def _weight(seed: int):
    w = np.random.default_rng(seed).normal(size=(16, 64)).astype(np.float32)
    return quantize_weight(w, WeightFormat(4, "block", 32), 0, 1)


def test_on_disk_store_gives_back_the_same_weight_and_removes_its_folder():
    store = CodeStore(on_disk=True)
    kept = {(i, j): _weight(3 * i + j) for i in range(2) for j in range(3)}
    for key, qw in kept.items():
        store.put(key, qw)
    folder = Path(store._dir.name)
    assert len(list(folder.glob("*.npy"))) == 6
    for key, qw in kept.items():
        got = store.get(key)
        assert (1, 0) in store and got.fmt == qw.fmt and got.axis == qw.axis
        np.testing.assert_array_equal(got.q, qw.q)
        np.testing.assert_array_equal(got.dequantize(), qw.dequantize())
        assert got.q is not store.get(key).q          # a fresh copy each time: the caller's to drop
    store.close()
    assert not folder.exists()


def test_memory_store_keeps_the_object():
    store = CodeStore()
    qw = _weight(0)
    store.put((0, 0), qw)
    assert store.get((0, 0)) is qw and not store.on_disk
