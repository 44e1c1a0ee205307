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
    half = np.full((4, 2), 0.5)  # confidence 0.5, accuracy 0.5 (argmax picks class 0: two of four right)
    assert calibration.expected_calibration_error(half, labels) == pytest.approx(0.0)


def test_temperature_undoes_a_deliberate_miscalibration():
    logits, labels = synthetic_logits()
    overconfident = 3.0 * logits  # the same ranking, three times too sharp
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
    first = calibration.log_softmax(1.0 * truth + rng.normal(size=truth.shape))  # weak
    second = calibration.log_softmax(1.5 * truth + rng.normal(size=truth.shape))  # stronger, independent noise
    weight = calibration.fit_fusion_weight(first, second, labels)
    accuracy = lambda w: (calibration.fused_log_probs(first, second, w).argmax(-1) == labels).mean()
    assert weight > 0.5 and accuracy(weight) > max(accuracy(0.0), (second.argmax(-1) == labels).mean())
    noise = calibration.log_softmax(rng.normal(size=truth.shape))
    assert calibration.fit_fusion_weight(first, noise, labels) <= 0.3  # an uninformative second: ~ignored


def test_calibration_report_fits_on_the_split_and_reports_held_out_figures():
    """At the end of training: temperatures and the fusion weight fitted on the validation split, the calibration
    error of a deliberately over-confident head and LM falling once calibrated (held out), fusion of two
    independent classifiers beating each."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=3000)
    truth = np.eye(5)[labels]
    cnn_logits = 4.0 * (1.2 * truth + rng.normal(size=truth.shape))  # over-confident, informative
    lm_scores = 3.0 * (1.0 * truth + rng.normal(size=truth.shape))  # over-confident, independent noise
    report = calibration.calibration_report(cnn_logits, labels, lm_scores)
    assert report["head_temperature"] == pytest.approx(calibration.fit_temperature(cnn_logits, labels))
    assert report["head_temperature"] > 2.0 and report["lm_temperature"] > 1.5
    assert report["head_ece"] > 0.1 and report["head_ece_calibrated"] < 0.03, report
    assert report["lm_ece"] > 0.1 and report["lm_ece_calibrated"] < 0.03, report
    head_accuracy = (cnn_logits.argmax(-1) == labels).mean()
    assert report["head_accuracy"] == pytest.approx(head_accuracy)
    assert report["fused_accuracy"] > head_accuracy + 0.03 and report["fusion_weight"] > 0.3, report
    # Held out: the fused accuracy is not the fit's own (on all examples it is at least as high).
    fitted = calibration.stored_fit(report)
    in_sample = calibration.calibrated_log_probs(fitted, cnn_logits, lm_scores)["fused"].argmax(-1)
    assert (in_sample == labels).mean() >= report["fused_accuracy"] - 0.01


def test_a_stored_fit_is_applied_as_it_is_on_other_data():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=500)
    logits = 5.0 * (np.eye(3)[labels] + rng.normal(size=(500, 3)))
    stored = {"head_temperature": 2.5, "lm_temperature": 1.5, "fusion_weight": 0.5, "fusion_temperature": 1.1}
    report = calibration.calibration_report(logits, labels, logits[:, ::-1], fitted=stored)
    assert {k: report[k] for k in stored} == stored  # applied, not refitted
    expected = calibration.expected_calibration_error(np.exp(calibration.log_softmax(logits, 2.5)), labels)
    assert report["head_ece_calibrated"] == pytest.approx(expected)
    head_only = calibration.calibration_report(logits, labels, logits, fitted={"head_temperature": 2.5})
    assert "fused_accuracy" not in head_only and "lm_ece" not in head_only  # a classifier's fit: the head alone
    # Checkpoints written before the LM's calibration stored the head's temperature as "temperature".
    assert calibration.stored_head_temperature({"temperature": 1.7, "ece": 0.1}) == 1.7
    assert calibration.stored_fit({"temperature": 1.7}) == {"head_temperature": 1.7}
    assert calibration.stored_fit(None) is None and calibration.stored_head_temperature(None) == 1.0


def test_non_finite_scores_are_refused_with_their_count_and_a_bound_is_warned_about():
    logits, labels = synthetic_logits(n=200)
    lm_scores = logits.copy()
    lm_scores[[3, 50], 1] = np.nan  # before: fit_temperature went to 20 without a word
    with pytest.raises(ValueError, match="the LM's class scores: 2 of 200 examples have a non-finite score"):
        calibration.calibration_report(logits, labels, lm_scores)
    probabilities = np.exp(calibration.log_softmax(logits))
    probabilities[7] = np.nan  # before: left out of the bins but counted in the total
    with pytest.raises(ValueError, match="1 of 200 examples"):
        calibration.expected_calibration_error(probabilities, labels)
    separable = 5.0 * np.eye(10)[labels]  # every label ahead of the rest: the demo's validation split
    with pytest.warns(calibration.CalibrationWarning, match="head_temperature=0.05.* separable"):
        report = calibration.calibration_report(separable, labels)
    assert report["head_temperature"] == pytest.approx(calibration.TEMPERATURE_RANGE[0], rel=1e-3)
    assert calibration.warn_at_bound({"head_temperature": 1.3, "lm_temperature": 0.9}) == []
