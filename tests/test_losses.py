"""Loss proxies: zero at the reference, probabilities not softmaxed twice, labels for ce."""

import numpy as np
import pytest

from cet_onnx.allocation.losses import default_loss, is_probability, log_softmax, loss_value

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("name", ["kl", "logmse", "mse"])
def test_label_free_losses_are_zero_at_reference_and_grow_with_noise(name):
    ref = RNG.normal(size=(32, 10)).astype(np.float32)
    assert loss_value(name, ref, ref) == pytest.approx(0.0, abs=1e-12)
    small = loss_value(name, ref, ref + 0.01 * RNG.normal(size=ref.shape))
    large = loss_value(name, ref, ref + 0.5 * RNG.normal(size=ref.shape))
    assert 0 < small < large


def test_probabilities_are_not_softmaxed_again():
    logits = RNG.normal(size=(16, 5))
    p = np.exp(log_softmax(logits))
    q = np.exp(log_softmax(logits + RNG.normal(size=logits.shape) * 0.3))
    assert is_probability(p)
    expected = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))
    assert loss_value("kl", p, q) == pytest.approx(expected, rel=1e-9)
    assert loss_value("kl", logits, np.log(q)) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_against_labels():
    logits = np.array([[10.0, 0.0], [0.0, 10.0]])
    assert loss_value("ce", logits, logits, labels=np.array([0, 1])) < 1e-3
    assert loss_value("ce", logits, logits, labels=np.array([1, 0])) > 9.0
    with pytest.raises(ValueError):
        loss_value("ce", logits, logits)


def test_default_loss_choice():
    assert default_loss(np.zeros((2, 10), np.float32), has_labels=True) == "ce"
    assert default_loss(np.zeros((2, 10), np.float32), has_labels=False) == "kl"
    assert default_loss(np.zeros((2, 10), np.float32), False, "logits") == "kl"
    assert default_loss(np.zeros((2, 10), np.float32), False, "embedding") == "cosine"
    assert default_loss(np.zeros((2, 1), np.float32), has_labels=False) == "mse"
    with pytest.raises(ValueError):
        loss_value("nope", np.zeros((1, 2)), np.zeros((1, 2)))
