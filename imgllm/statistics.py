"""Statistics a reviewer asks of two classifiers evaluated on the same images: intervals and a paired test.

    wilson_interval(correct, total)       95% interval of an accuracy (Wilson score interval)
    mcnemar_exact(a_correct, b_correct)   the paired exact McNemar test: discordant counts and two-sided p-value
    accuracy_comparison(labels, preds)    both, for every classifier and every pair, as flat report keys

Two classifiers that differ on 6 images in 10,000 tie, whatever their accuracies' last digits say: McNemar's test
looks only at the images where exactly one of them is right (b of one kind, c of the other) and asks how likely so
uneven a split is if each were equally likely to be the one that is right: p = P(min(b, c) or fewer | Binomial(b + c,
1/2)), doubled. Computed exactly with Python's integers (no approximation, no scipy).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of the proportion correct / total (95% with the default z)."""
    if total <= 0:
        raise ValueError(f"an interval needs at least one example, got total={total}")
    if not 0 <= correct <= total:
        raise ValueError(f"correct={correct} must be between 0 and total={total}")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, float]:
    """The exact McNemar test of two classifiers on the same examples: {"a_only": images only a gets right,
    "b_only": only b, "p_value": two-sided exact p} (1.0 when they never disagree)."""
    a_correct, b_correct = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    if a_correct.shape != b_correct.shape or a_correct.ndim != 1:
        raise ValueError(
            f"paired results must be two vectors of one length, got {a_correct.shape} and {b_correct.shape}"
        )
    a_only, b_only = int((a_correct & ~b_correct).sum()), int((b_correct & ~a_correct).sum())
    return {
        "a_only": a_only,
        "b_only": b_only,
        "p_value": exact_binomial_two_sided(min(a_only, b_only), a_only + b_only),
    }


def exact_binomial_two_sided(smaller: int, trials: int) -> float:
    """2 * P(X <= smaller) for X ~ Binomial(trials, 1/2), capped at 1 (exact: integer arithmetic)."""
    if trials == 0:
        return 1.0
    tail = sum(math.comb(trials, k) for k in range(smaller + 1))
    return min(1.0, 2 * tail / 2**trials)


def accuracy_comparison(labels: np.ndarray, predictions: Mapping[str, np.ndarray]) -> dict[str, float]:
    """For every classifier NAME: NAME_accuracy and its 95% Wilson interval (NAME_accuracy_ci_low / _high); for every
    pair A, B (in the given order): mcnemar_A_B_p and the discordant counts mcnemar_A_B_A_only / _B_only."""
    labels = np.asarray(labels)
    correct = {name: np.asarray(predicted) == labels for name, predicted in predictions.items()}
    report = {}
    for name, right in correct.items():
        low, high = wilson_interval(int(right.sum()), right.size)
        report.update(
            {f"{name}_accuracy": float(right.mean()), f"{name}_accuracy_ci_low": low, f"{name}_accuracy_ci_high": high}
        )
    for first, second in itertools.combinations(correct, 2):
        test = mcnemar_exact(correct[first], correct[second])
        report.update(
            {
                f"mcnemar_{first}_{second}_p": test["p_value"],
                f"mcnemar_{first}_{second}_{first}_only": float(test["a_only"]),
                f"mcnemar_{first}_{second}_{second}_only": float(test["b_only"]),
            }
        )
    return report
