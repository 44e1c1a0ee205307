"""Calibration error, temperature scaling and score fusion (imgllm.calibration) on synthetic classifiers whose
truth is known."""
import numpy as np
import pytest

from imgllm import calibration


def synthetic_logits(n=4000, classes=10, sharpness=2.0, seed=0):
    """(logits, labels) of a classifier that is calibrated at temperature 1: labels are drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = sharpness * rng.normal(size=(n, classes))
    probabilities = np.exp(calibration.log_softmax(logits))
    labels = np.array([rng.choice(classes, p=p) for p in probabilities])
    return logits, labels


def test_ece_of_known_cases():
    labels = np.array([0, 1, 0, 1])
    certain_and_right = np.eye(2)[labels]
    assert calibration.expected_calibration_error(certain_and_right, labels) == 0.0
    assert calibration.expected_calibration_error(np.eye(2)[1 - labels], labels) == 1.0
    half = np.full((4, 2), 0.5)        # confidence 0.5, accuracy 0.5 (argmax picks class 0: two of four right)
    assert calibration.expected_calibration_error(half, labels) == pytest.approx(0.0)


def test_temperature_undoes_a_deliberate_miscalibration():
    logits, labels = synthetic_logits()
    overconfident = 3.0 * logits          # the same ranking, three times too sharp
    temperature = calibration.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = calibration.expected_calibration_error(np.exp(calibration.log_softmax(overconfident)), labels)
    after = calibration.expected_calibration_error(np.exp(calibration.log_softmax(overconfident, temperature)), labels)
    assert before > 0.15 and after < 0.03, (before, after)
    assert np.array_equal(calibration.log_softmax(overconfident, temperature).argmax(-1), overconfident.argmax(-1))


def test_fusion_weight_prefers_the_informative_second_classifier():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=2000)
    truth = np.eye(4)[labels]
    first = calibration.log_softmax(1.0 * truth + rng.normal(size=truth.shape))      # weak
    second = calibration.log_softmax(1.5 * truth + rng.normal(size=truth.shape))     # stronger, independent noise
    weight = calibration.fit_fusion_weight(first, second, labels)
    accuracy = lambda w: (calibration.fused_log_probs(first, second, w).argmax(-1) == labels).mean()
    assert weight > 0.5 and accuracy(weight) > max(accuracy(0.0), (second.argmax(-1) == labels).mean())
    noise = calibration.log_softmax(rng.normal(size=truth.shape))
    assert calibration.fit_fusion_weight(first, noise, labels) <= 0.3      # an uninformative second: ~ignored
