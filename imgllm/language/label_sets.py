"""Label sets a classifier was never trained on, with their truth derived from its classes, and class captions.

    sets = read_label_sets("cifar10")            # the packaged cifar10_label_sets.json (or any such file's path)
    sets["synonyms"].labels                        # ("plane", "car", ...)
    sets["synonyms"].truth_ids(class_names, y)     # the right label of each image, from its CIFAR-10 class y
    read_class_captions("cifar10", class_names)    # {class: natural captions} (cifar10_captions.json)
    label_set_report(scores, truth, prior_scores=..., cnn_predictions=...)   # accuracy, interval, McNemar, alpha

A label-set file is JSON: {set name: {"labels": [...], "templates": [... "{label}" ...], "truth": {class: label}}}
(keys starting with "_" are comments). A class-captions file: {class: [caption, ...]}. Both are checked when read;
an error names the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from imgllm.calibration import (
    check_finite,
    fit_prior_weight,
    held_out_prior_predictions,
    marginal_log_prior,
)
from imgllm.language.scoring import fill_templates
from imgllm.statistics import accuracy_comparison

# Files shipped in this package, by the name a config or command line may give instead of a path.
PACKAGED_LABEL_SETS = {"cifar10": "cifar10_label_sets.json"}
PACKAGED_CLASS_CAPTIONS = {"cifar10": "cifar10_captions.json"}
MAX_FILE_BYTES = 1 << 20  # label sets and captions are written by hand: a larger file is refused unread


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Labels to classify among, the prompts that score them, and the right label of each class."""

    name: str
    labels: tuple[str, ...]
    templates: tuple[str, ...]
    truth: Mapping[str, str]  # class name -> one of labels

    def truth_ids(self, class_names: Sequence[str], class_ids: np.ndarray) -> np.ndarray:
        """The index into `labels` of each image's right label, from its class id into `class_names`."""
        missing = [name for name in class_names if name not in self.truth]
        if missing:
            raise ValueError(f"label set {self.name!r} gives no truth for class {missing[0]!r}")
        per_class = np.array([self.labels.index(self.truth[name]) for name in class_names], np.int64)
        return per_class[np.asarray(class_ids)]


def packaged_file(source: str | os.PathLike, packaged: Mapping[str, str]) -> str:
    """The path of `source`: an existing file as given, else a name of a file shipped with this package."""
    path = os.path.expanduser(os.fspath(source))
    if os.path.exists(path) or os.fspath(source) not in packaged:
        return path
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), packaged[os.fspath(source)])


def _read_json_object(path: str) -> dict:
    """A JSON object from a small regular file; one-line errors naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.getsize(path) > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {os.path.getsize(path)} bytes, more than {MAX_FILE_BYTES} for a hand-written file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not JSON text ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return {key: value for key, value in data.items() if not key.startswith("_")}


def _strings(value, where: str) -> tuple[str, ...]:
    """A non-empty list of non-empty, unique strings, stripped; ValueError naming `where` otherwise."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of strings")
    items = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}: {item!r} is not a non-empty string")
        items.append(item.strip())
    if len(set(items)) != len(items):
        raise ValueError(f"{where}: {sorted(i for i in items if items.count(i) > 1)[0]!r} is repeated")
    return tuple(items)


def _label_set(name: str, entry, where: str) -> LabelSet:
    """One checked LabelSet from its JSON entry."""
    if not isinstance(entry, dict) or set(entry) != {"labels", "templates", "truth"}:
        raise ValueError(f"{where}: expected an object with exactly labels, templates and truth")
    labels = _strings(entry["labels"], f"{where}.labels")
    templates = _strings(entry["templates"], f"{where}.templates")
    try:
        fill_templates(labels, templates)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    truth = entry["truth"]
    if not isinstance(truth, dict) or not truth:
        raise ValueError(f"{where}.truth: expected an object mapping each class to a label")
    for class_name, label in truth.items():
        if label not in labels:
            raise ValueError(f"{where}.truth.{class_name}: {label!r} is not one of its labels")
    return LabelSet(name=name, labels=labels, templates=templates, truth=dict(truth))


def read_label_sets(source: str | os.PathLike = "cifar10") -> dict[str, LabelSet]:
    """{name: LabelSet} from a label-set file's path or a packaged name (PACKAGED_LABEL_SETS)."""
    path = packaged_file(source, PACKAGED_LABEL_SETS)
    data = _read_json_object(path)
    if not data:
        raise ValueError(f"{path}: no label set")
    return {name: _label_set(name, entry, f"{path}: {name}") for name, entry in data.items()}


def read_class_captions(source: str | os.PathLike, class_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """{class name: its captions} from a class-captions file's path or a packaged name (PACKAGED_CLASS_CAPTIONS);
    every class of `class_names` needs at least one caption, and the file names no other class."""
    path = packaged_file(source, PACKAGED_CLASS_CAPTIONS)
    data = _read_json_object(path)
    unknown = sorted(set(data) - set(class_names))
    if unknown:
        raise ValueError(f"{path}: {unknown[0]!r} is not a class of the classifier ({', '.join(class_names)})")
    missing = [name for name in class_names if name not in data]
    if missing:
        raise ValueError(f"{path}: no captions for class {missing[0]!r}")
    return {name: _strings(data[name], f"{path}: {name}") for name in class_names}


def label_set_report(
    scores: np.ndarray,
    truth: np.ndarray,
    *,
    prior_scores: np.ndarray | None = None,
    cnn_predictions: np.ndarray | None = None,
) -> dict[str, float]:
    """What the LM's scores [N, L] of one label set are worth on N images whose right labels are `truth` [N].

    lm_accuracy with its 95% Wilson interval; with prior_scores (the same labels' scores on a sample of training
    images) the prior-corrected scores log p(prompt | image) - alpha * log p(prompt) (`imgllm.calibration`:
    log p(prompt) the log-mean over those images, alpha fitted for accuracy): alpha fitted on all N images,
    prior_accuracy held out (2-fold: each half scored with the alpha of the other) with its interval, and
    prior_gain = prior_accuracy - lm_accuracy; with cnn_predictions (the CNN's classes mapped to this set's labels)
    cnn_accuracy and the exact McNemar tests of the LM (and the prior-corrected LM) against it.
    """
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth)
    check_finite(scores, "label-set scores")
    predictions = {"lm": scores.argmax(-1)}
    report: dict[str, float] = {}
    if prior_scores is not None:
        log_prior = marginal_log_prior(prior_scores)
        report["alpha"] = fit_prior_weight(scores, log_prior, truth)
        predictions["prior"], fold_alphas = held_out_prior_predictions(scores, log_prior, truth)
        report.update({f"alpha_fold{i}": a for i, a in enumerate(fold_alphas)})
    if cnn_predictions is not None:
        predictions = {"cnn": np.asarray(cnn_predictions), **predictions}
    comparison = accuracy_comparison(truth, predictions)
    report.update(
        {
            key: float(value)
            for key, value in comparison.items()
            if not key.startswith("mcnemar") or key.startswith("mcnemar_cnn_")
        }
    )
    if "prior" in predictions:
        report["prior_gain"] = report["prior_accuracy"] - report["lm_accuracy"]
    return report
