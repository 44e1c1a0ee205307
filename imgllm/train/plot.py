"""Pictures of a training run: curves from metrics.jsonl, and a classifier's confusion matrix.

    python -m imgllm.train.plot runs/cifar10                 # writes runs/cifar10/curves.png
    python -m imgllm.train.plot runs/cifar10 --out c.png

`curves_figure` draws loss, accuracy (when the run has it) and learning rate against the step, train beside eval
(final evaluation as a marker); `confusion_figure` draws true against predicted class, counts shown as colour and
each row's recall in its label. Matplotlib renders off screen (Agg), so both work on a machine without a display.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from imgllm.train.metrics_log import read_metrics  # noqa: E402

CURVES_FILE = "curves.png"
# "accuracy" is a classifier's top-1 (a captioner's CNN head), "token_accuracy" next-token agreement, "lm_accuracy"
# classification by the LM: three quantities, three panels (each drawn when the records hold it).
PANELS = ("loss", "accuracy", "token_accuracy", "lm_accuracy", "learning_rate")


def series(records: Sequence[Mapping[str, Any]], split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of metric `name` in the records of `split`, in step order."""
    points = sorted((r["step"], r[name]) for r in records if r.get("split") == split and name in r)
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps), np.asarray(values, dtype=float)


def curves_figure(records: Sequence[Mapping[str, Any]], title: str = "") -> plt.Figure:
    """A figure with one panel for each metric of PANELS that the records hold."""
    panels = [name for name in PANELS if any(name in r for r in records)]
    if not panels:
        raise ValueError("no loss, accuracy or learning_rate in the metrics: nothing to plot")
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, name in zip(axes[0], panels):
        for split, style in (("train", "-"), ("eval", "o-")):
            steps, values = series(records, split, name)
            if len(steps):
                axis.plot(steps, values, style, label=split, markersize=3)
        steps, values = series(records, "final_eval", name)
        if len(steps):
            axis.plot(steps, values, "*", markersize=10, label="final eval")
        axis.set_xlabel("step")
        axis.set_title(name.replace("_", " "))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str = "") -> plt.Figure:
    """The confusion matrix as an image: counts in each cell, each true class's recall beside its name."""
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(matrix, cmap="Blues")
    recall = np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)
    ticks = np.arange(len(class_names))
    axis.set_xticks(ticks, labels=class_names, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(ticks, labels=[f"{name} ({r:.0%})" for name, r in zip(class_names, recall)], fontsize=8)
    if len(class_names) <= 20:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, column), count in np.ndenumerate(matrix):
            axis.text(
                column,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if count > threshold else "black",
            )
    axis.set_xlabel("predicted")
    axis.set_ylabel("true (recall)")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    axis.set_title(f"{title + ': ' if title else ''}accuracy {accuracy:.2%} of {matrix.sum()}")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    return figure


def save_figure(figure: plt.Figure, path: str) -> str:
    """Writes `figure` as a PNG at `path` (its folder made), closes it, and returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_run(workdir: str, out: str | None = None) -> str:
    """Draws <workdir>/metrics.jsonl into `out` (default <workdir>/curves.png); returns the path written."""
    records = read_metrics(workdir)
    return save_figure(
        curves_figure(records, title=os.path.basename(os.path.abspath(workdir))),
        out or os.path.join(workdir, CURVES_FILE),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgllm.train.plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="train.py work directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help=f"PNG to write (default: WORKDIR/{CURVES_FILE})")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.workdir, args.out))
    except (FileNotFoundError, ValueError) as error:
        print(f"plot: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
