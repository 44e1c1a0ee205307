"""Intervals and paired tests of classifier accuracies (imgllm/statistics.py) against scipy and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from imgllm import calibration
from imgllm.statistics import accuracy_comparison, exact_binomial_two_sided, mcnemar_exact, wilson_interval


@pytest.mark.parametrize("correct, total", [(0, 10), (3, 10), (10, 10), (9014, 10000), (4508, 5000), (1, 1)])
def test_wilson_interval_equals_scipys(correct, total):
    want = stats.binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    np.testing.assert_allclose(wilson_interval(correct, total), (want.low, want.high), rtol=1e-9, atol=1e-12)


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError, match="at least one"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="correct=11"):
        wilson_interval(11, 10)


@pytest.mark.parametrize("smaller, trials", [(0, 1), (0, 6), (2, 8), (3, 6), (40, 100), (590, 1200)])
def test_exact_mcnemar_p_equals_scipys_binomial_test(smaller, trials):
    want = stats.binomtest(smaller, trials, 0.5, alternative="two-sided").pvalue
    assert exact_binomial_two_sided(smaller, trials) == pytest.approx(want, rel=1e-9)


def test_mcnemar_counts_only_the_images_where_one_classifier_is_right():
    """A hand-worked table: both right 5, both wrong 2, only A 6, only B 1 → p = 2 * (1 + 7) / 2^7 = 0.125."""
    a = np.array([1] * 5 + [0] * 2 + [1] * 6 + [0] * 1, bool)
    b = np.array([1] * 5 + [0] * 2 + [0] * 6 + [1] * 1, bool)
    assert mcnemar_exact(a, b) == {"a_only": 6, "b_only": 1, "p_value": 0.125}
    assert mcnemar_exact(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="one length"):
        mcnemar_exact(a, b[:-1])


def test_accuracy_comparison_reports_every_classifier_and_pair():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    report = accuracy_comparison(
        labels, {"head": np.array([0, 1, 2, 0, 1, 2, 0, 0]), "lm": np.array([0, 1, 0, 0, 1, 2, 1, 1])}
    )
    assert report["head_accuracy"] == 7 / 8 and report["lm_accuracy"] == 6 / 8
    assert report["head_accuracy_ci_low"] < 7 / 8 < report["head_accuracy_ci_high"]
    assert (report["mcnemar_head_lm_head_only"], report["mcnemar_head_lm_lm_only"]) == (2, 1)
    assert report["mcnemar_head_lm_p"] == 1.0


def test_calibration_report_carries_the_intervals_and_the_paired_tests():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 3 * np.eye(4)[labels]
    lm_scores = rng.normal(size=(300, 4)) + 1 * np.eye(4)[labels]
    report = calibration.calibration_report(logits, labels, lm_scores)
    for name in ("head", "lm", "fused"):
        assert report[f"{name}_accuracy_ci_low"] <= report[f"{name}_accuracy"] <= report[f"{name}_accuracy_ci_high"]
    assert report["mcnemar_head_lm_p"] < 1e-6  # the head is much better here
    assert report["head_accuracy"] == (logits.argmax(-1) == labels).mean()
