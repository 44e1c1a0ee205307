"""Honest probabilities: expected calibration error, temperature scaling, and fusing two classifiers' scores.

A network's softmax is usually over-confident; dividing its logits by one temperature T fitted on held-out data
(Guo et al. 2017, "On Calibration of Modern Neural Networks") keeps every prediction and makes the confidences
match the accuracy. Fusion adds a second classifier's log-probabilities with a weight fitted the same way.

    ece = expected_calibration_error(softmax(logits), labels)          # 15 equal-width bins, as in Guo et al.
    t = fit_temperature(validation_logits, validation_labels)          # argmin_T NLL(softmax(logits / T))
    w = fit_fusion_weight(cnn_log_probs, lm_log_probs, labels)         # argmax_w accuracy of cnn + w * lm

All functions take and return numpy (host) arrays: they run once, after training, on a validation split.
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)
FUSION_WEIGHTS = tuple(np.round(np.linspace(0.0, 3.0, 31), 2))


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """float64 log-probabilities of `logits / temperature` over the last axis."""
    scaled = np.asarray(logits, np.float64) / temperature
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    return scaled - np.log(np.exp(scaled).sum(axis=-1, keepdims=True))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the |accuracy - confidence| of equal-width confidence bins, weighted by the share of examples in each.

    `probabilities` [N, C] (rows sum to 1); the confidence of an example is its top probability.
    """
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("expected_calibration_error needs at least one example")
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)       # bin b holds (b/bins, (b+1)/bins]
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(error)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log p(label) under softmax(logits / temperature)."""
    log_probs = log_softmax(logits, temperature)
    return float(-log_probs[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, tolerance: float = 1e-4) -> float:
    """The temperature T in TEMPERATURE_RANGE that minimises the NLL of softmax(logits / T) on (logits, labels).

    NLL is unimodal in log T, so a golden-section search on log T finds it; deterministic, no optimiser state.
    """
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one example")
    objective = lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t)))
    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = objective(a), objective(b)
    while high - low > tolerance:
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = objective(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = objective(b)
    return float(np.exp((low + high) / 2.0))


def fused_log_probs(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    """Normalised log-probabilities of first + weight * second (two classifiers' log-probabilities, [N, C])."""
    return log_softmax(np.asarray(first, np.float64) + weight * np.asarray(second, np.float64))


def fit_fusion_weight(first: np.ndarray, second: np.ndarray, labels: np.ndarray,
                      weights: tuple[float, ...] = FUSION_WEIGHTS) -> float:
    """The weight w among `weights` whose fusion first + w * second is most accurate on (labels); ties go to the
    lower NLL, then the smaller w (w = 0 is the first classifier alone, so fusion never fits worse than it)."""
    labels = np.asarray(labels)

    def badness(weight):
        fused = fused_log_probs(first, second, weight)
        accuracy = (fused.argmax(-1) == labels).mean()
        return -accuracy, float(-fused[np.arange(len(labels)), labels].mean()), weight

    return float(min(weights, key=badness))
