"""Honest probabilities: expected calibration error, temperature scaling, and fusing two classifiers' scores.

A network's softmax is usually over-confident; dividing its logits by one temperature T fitted on held-out data
(Guo et al. 2017, "On Calibration of Modern Neural Networks") keeps every prediction and makes the confidences
match the accuracy. Fusion adds a second classifier's log-probabilities with a weight fitted the same way.

    ece = expected_calibration_error(softmax(logits), labels)          # 15 equal-width bins, as in Guo et al.
    t = fit_temperature(validation_logits, validation_labels)          # argmin_T NLL(softmax(logits / T))
    w = fit_fusion_weight(cnn_log_probs, lm_log_probs, labels)         # argmax_w accuracy of cnn + w * lm
    prior = marginal_log_prior(train_lm_scores)                        # log p(prompt), mean over training images
    a = fit_prior_weight(lm_scores, prior, labels)                     # argmax_a accuracy of scores - a * prior

The whole report a trainer stores and `eval` prints is `calibration_report`: the fit on the validation split, and
the calibration error and the fused accuracy *held out* (2-fold cross-fitting: each half is scored with the values
fitted on the other half), so that the reported gains are not the fit's own optimism.

All functions take and return numpy (host) arrays: they run once, after training, on a validation split.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np

from imgllm.statistics import accuracy_comparison

ECE_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)
FUSION_WEIGHTS = tuple(np.round(np.linspace(0.0, 3.0, 31), 2))
BOUND_MARGIN = 1.01  # a fitted temperature within 1% of a bound of TEMPERATURE_RANGE is the bound


class CalibrationWarning(UserWarning):
    """A fitted value that is the search's bound, not a minimum: its probabilities are extreme."""


def check_finite(values: np.ndarray, name: str) -> None:
    """Raises ValueError naming `name` and how many of its rows hold a NaN or an infinity (one bad LM score would
    otherwise drag a fitted temperature to a bound, or drop out of ECE's bins)."""
    values = np.asarray(values, np.float64)
    bad = int((~np.isfinite(values.reshape(len(values), -1))).any(axis=-1).sum()) if values.size else 0
    if bad:
        raise ValueError(
            f"{name}: {bad} of {len(values)} examples have a non-finite score (NaN or infinity); "
            "calibration needs finite scores"
        )


def warn_at_bound(fitted: dict) -> list[str]:
    """Warns (`CalibrationWarning`) for each fitted temperature at a bound of TEMPERATURE_RANGE, and returns their
    names. At 0.05 the validation examples are separable (every probability prints as 1.0 or 0.0); at 20 the scores
    carry almost no information."""
    low, high = TEMPERATURE_RANGE
    at_bound = [
        name
        for name, value in fitted.items()
        if name.endswith("temperature") and not low * BOUND_MARGIN < value < high / BOUND_MARGIN
    ]
    for name in at_bound:
        extreme = "separable: probabilities will be 1.0 or 0.0" if fitted[name] < 1 else "near uniform"
        warnings.warn(
            f"calibration: {name}={fitted[name]:.4g} is the bound of the search {TEMPERATURE_RANGE}, not "
            f"a fitted value; the validation scores are {extreme}",
            CalibrationWarning,
            stacklevel=2,
        )
    return at_bound


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
    check_finite(probabilities, "expected_calibration_error")
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # bin b holds (b/bins, (b+1)/bins]
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

    NLL is unimodal in log T, so a golden-section search on log T finds it; deterministic, no optimiser state. A
    minimum at a bound is that bound (`bound_if_better`), which `warn_at_bound` reports.
    """
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one example")
    check_finite(logits, "fit_temperature")
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
    return float(np.exp(bound_if_better(objective, (low + high) / 2.0)))


def bound_if_better(objective, log_t: float) -> float:
    """`log_t`, or a bound of TEMPERATURE_RANGE (in log) whose objective is lower, or is 0 at the lower one: on
    separable examples the NLL rounds to exactly 0 below some T, a flat stretch the search stops anywhere on."""
    found = objective(log_t)
    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    at_low = objective(low)
    if at_low < found or at_low == 0.0:
        return low
    return high if objective(high) < found else log_t


def fused_log_probs(first: np.ndarray, second: np.ndarray, weight: float) -> np.ndarray:
    """Normalised log-probabilities of first + weight * second (two classifiers' log-probabilities, [N, C])."""
    return log_softmax(np.asarray(first, np.float64) + weight * np.asarray(second, np.float64))


def fit_fusion_weight(
    first: np.ndarray, second: np.ndarray, labels: np.ndarray, weights: tuple[float, ...] = FUSION_WEIGHTS
) -> float:
    """The weight w among `weights` whose fusion first + w * second is most accurate on (labels); ties go to the
    lower NLL, then the smaller w (w = 0 is the first classifier alone, so fusion never fits worse than it)."""
    labels = np.asarray(labels)

    def badness(weight):
        fused = fused_log_probs(first, second, weight)
        accuracy = (fused.argmax(-1) == labels).mean()
        return -accuracy, float(-fused[np.arange(len(labels)), labels].mean()), weight

    return float(min(weights, key=badness))


PRIOR_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.5, 31), 2))


def marginal_log_prior(scores: np.ndarray) -> np.ndarray:
    """[C] log p(prompt_c) estimated as log of the mean over images of p(prompt_c | image's prefix): the log-mean-exp
    over axis 0 of an LM's class scores [N, C] on a sample of training images (the prompt's marginal likelihood
    under the images the prefix was trained on, unlike the scores after one neutral or zero prefix)."""
    scores = np.asarray(scores, np.float64)
    check_finite(scores, "the prior's class scores")
    if scores.ndim != 2 or not len(scores):
        raise ValueError(f"the prior needs class scores [N >= 1, C], got shape {scores.shape}")
    peak = scores.max(axis=0)
    return peak + np.log(np.exp(scores - peak).mean(axis=0))


def prior_corrected_scores(scores: np.ndarray, log_prior: np.ndarray, weight: float) -> np.ndarray:
    """score(label) = log p(prompt | image) - weight * log p(prompt): [N, C] scores with the LM's prior taken out
    (weight 0: plain likelihood; 1 with the neutral prefix's scores as the prior: information gain)."""
    return np.asarray(scores, np.float64) - weight * np.asarray(log_prior, np.float64)


def fit_prior_weight(
    scores: np.ndarray, log_prior: np.ndarray, labels: np.ndarray, weights: tuple[float, ...] = PRIOR_WEIGHTS
) -> float:
    """The weight among `weights` whose prior-corrected scores are most accurate on (labels); ties go to the
    smaller weight (0, plain likelihood, wins unless the correction helps)."""
    labels = np.asarray(labels)
    accuracy = lambda w: float((prior_corrected_scores(scores, log_prior, w).argmax(-1) == labels).mean())
    return float(min(weights, key=lambda w: (-accuracy(w), w)))


HELD_OUT_FOLDS = 2


def held_out_folds(count: int, folds: int = HELD_OUT_FOLDS, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(held-out rows, the other rows) of each fold of a fixed random split of `count` examples: every example is
    held out once, scored with what the other rows fitted."""
    order = np.random.default_rng(seed).permutation(count)
    for part in np.array_split(order, folds):
        yield part, np.setdiff1d(order, part)


def held_out_prior_predictions(
    scores: np.ndarray, log_prior: np.ndarray, labels: np.ndarray, *, folds: int = HELD_OUT_FOLDS, seed: int = 0
) -> tuple[np.ndarray, list[float]]:
    """(predicted label [N] of every example with the prior weight fitted on the other folds, the weight of each
    fold): the accuracy of prior correction without the fit's own optimism."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    predictions, weights = np.zeros(len(labels), np.int64), []
    for part, rest in held_out_folds(len(labels), folds, seed):
        weights.append(fit_prior_weight(scores[rest], log_prior, labels[rest]))
        predictions[part] = prior_corrected_scores(scores[part], log_prior, weights[-1]).argmax(-1)
    return predictions, weights


def fit_calibration(cnn_logits: np.ndarray, labels: np.ndarray, lm_scores: np.ndarray | None = None) -> dict:
    """The values calibration fits on (logits, labels): head_temperature; with the LM's class scores also
    lm_temperature, fusion_weight (of the calibrated log-probabilities, `fit_fusion_weight`) and fusion_temperature
    (of their weighted sum)."""
    fitted = {"head_temperature": fit_temperature(cnn_logits, labels)}
    if lm_scores is not None:
        fitted["lm_temperature"] = fit_temperature(lm_scores, labels)
        cnn, lm = log_softmax(cnn_logits, fitted["head_temperature"]), log_softmax(lm_scores, fitted["lm_temperature"])
        fitted["fusion_weight"] = fit_fusion_weight(cnn, lm, labels)
        fitted["fusion_temperature"] = fit_temperature(cnn + fitted["fusion_weight"] * lm, labels)
    return fitted


def calibrated_log_probs(fitted: dict, cnn_logits: np.ndarray, lm_scores: np.ndarray | None = None) -> dict:
    """{"cnn", and with LM scores "lm" and "fused"}: [N, C] log-probabilities under the values of `fit_calibration`
    (the same formulas as `imgllm.pipeline.caption.class_log_probs` inside jit)."""
    cnn = log_softmax(cnn_logits, fitted["head_temperature"])
    if lm_scores is None:
        return {"cnn": cnn}
    lm = log_softmax(lm_scores, fitted["lm_temperature"])
    fused = log_softmax(cnn + fitted["fusion_weight"] * lm, fitted["fusion_temperature"])
    return {"cnn": cnn, "lm": lm, "fused": fused}


def held_out_log_probs(
    cnn_logits: np.ndarray,
    labels: np.ndarray,
    lm_scores: np.ndarray | None = None,
    *,
    folds: int = HELD_OUT_FOLDS,
    seed: int = 0,
) -> dict:
    """`calibrated_log_probs` of every example under values fitted on the other folds (a fixed random split)."""
    result = {}
    for part, rest in held_out_folds(len(labels), folds, seed):
        fitted = fit_calibration(cnn_logits[rest], labels[rest], None if lm_scores is None else lm_scores[rest])
        scored = calibrated_log_probs(fitted, cnn_logits[part], None if lm_scores is None else lm_scores[part])
        for name, values in scored.items():
            result.setdefault(name, np.zeros((len(labels), values.shape[-1])))[part] = values
    return result


def calibration_report(
    cnn_logits: np.ndarray, labels: np.ndarray, lm_scores: np.ndarray | None = None, *, fitted: dict | None = None
) -> dict:
    """Calibration of a classifier (and of the LM's class scores, and their fusion) on a held-out split.

    fitted None (the end of training, on the validation split): the values are fitted here (`fit_calibration`,
    on all examples: what is stored), and the calibrated figures are held out (`held_out_log_probs`). fitted given
    (a stored fit, evaluated on another split): its values are applied as they are.
    Non-finite logits or scores are refused with their count; a fitted temperature at the search's bound is warned
    about (`warn_at_bound`).
    Returns the fitted values, head_accuracy (the CNN head's, no test-time augmentation) and head_ece /
    head_ece_calibrated (its expected calibration error before and after), and with LM scores lm_accuracy, lm_ece /
    lm_ece_calibrated, fused_accuracy and fused_ece_calibrated; for each classifier the 95% Wilson interval of its
    accuracy (NAME_accuracy_ci_low / _high) and for each pair the exact McNemar test on the same images
    (mcnemar_A_B_p and the discordant counts; `imgllm.statistics.accuracy_comparison`).
    """
    cnn_logits, labels = np.asarray(cnn_logits, np.float64), np.asarray(labels)
    lm_scores = None if lm_scores is None else np.asarray(lm_scores, np.float64)
    check_finite(cnn_logits, "calibration: the CNN's logits")
    if lm_scores is not None:
        check_finite(lm_scores, "calibration: the LM's class scores")
    if fitted is None:
        fitted = fit_calibration(cnn_logits, labels, lm_scores)
        warn_at_bound(fitted)
        calibrated = held_out_log_probs(cnn_logits, labels, lm_scores)
    else:
        lm_scores = lm_scores if "lm_temperature" in fitted else None  # a fit of the head alone: report the head
        calibrated = calibrated_log_probs(fitted, cnn_logits, lm_scores)
    ece = lambda log_probs: expected_calibration_error(np.exp(log_probs), labels)
    report = {**fitted, "head_ece": ece(log_softmax(cnn_logits)), "head_ece_calibrated": ece(calibrated["cnn"])}
    predictions = {"head": cnn_logits.argmax(-1)}
    if lm_scores is not None:
        report.update(
            lm_ece=ece(log_softmax(lm_scores)),
            lm_ece_calibrated=ece(calibrated["lm"]),
            fused_ece_calibrated=ece(calibrated["fused"]),
        )
        predictions.update(lm=lm_scores.argmax(-1), fused=calibrated["fused"].argmax(-1))
    report.update(accuracy_comparison(labels, predictions))  # accuracies, 95% intervals, paired McNemar tests
    return {key: float(value) for key, value in report.items()}


def stored_head_temperature(calibration: dict | None) -> float:
    """The CNN head's temperature of a checkpoint's stored calibration (1 when none; "temperature" in checkpoints
    written before the LM's calibration was stored beside it)."""
    calibration = calibration or {}
    return float(calibration.get("head_temperature", calibration.get("temperature", 1.0)))


def stored_fit(calibration: dict | None) -> dict | None:
    """The fitted values (`fit_calibration`'s keys) of a stored calibration report, or None when it has none."""
    if not calibration:
        return None
    keys = ("lm_temperature", "fusion_weight", "fusion_temperature")
    fitted = {"head_temperature": stored_head_temperature(calibration)}
    fitted.update({key: float(calibration[key]) for key in keys if key in calibration})
    return fitted
