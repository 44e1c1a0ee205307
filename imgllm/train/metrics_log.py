"""Where training metrics go: <workdir>/metrics.jsonl (one JSON record a line) and TensorBoard event files.

Every record has "step" and "split" ("train", "eval", "final_eval") and numbers. The JSON-lines file is the
record of a run (`python -m imgllm.plot WORKDIR` draws it); the event files, one folder a split under
<workdir>/tensorboard, are for `tensorboard --logdir WORKDIR/tensorboard` while a run goes on. Pictures (a
classifier's confusion matrix) and text go to TensorBoard only (`MetricsWriter.image`, `MetricsWriter.text`). A
resumed run first drops what it will write again (`MetricsWriter.rewind` for the file, TensorBoard's purge step for
events), so neither holds a step twice. Only process 0 writes.
"""

from __future__ import annotations

import json
import numbers
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.utils import figure_to_image

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Appends each record to <workdir>/metrics.jsonl and its numbers to TensorBoard (only on process 0)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR) if tensorboard else None
        self.enabled = jax.process_index() == 0
        self.purge_step: int | None = None
        self.event_writers: dict[str, SummaryWriter] = {}
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard_dir is not None:
            events = self._event_writer(record["split"])
            for name, value in scalars(record).items():
                events.add_scalar(name, value, record["step"])

    def image(self, split: str, tag: str, figure_or_array: Any, step: int) -> None:
        """Writes a picture to TensorBoard under `split` and `tag` at `step`: a matplotlib figure (rendered off
        screen, then closed) or an RGB array [H, W, 3] (uint8, or floats in [0, 1]). Nothing without TensorBoard."""
        pixels = rgb_image(figure_or_array)
        if self.enabled and self.tensorboard_dir is not None:
            self._event_writer(split).add_image(tag, pixels, step, dataformats="HWC")

    def text(self, split: str, tag: str, text: str, step: int) -> None:
        """Writes `text` (TensorBoard shows it as Markdown) under `split` and `tag` at `step`, where TensorBoard is
        written."""
        if self.enabled and self.tensorboard_dir is not None:
            self._event_writer(split).add_text(tag, text, step)

    def rewind(self, step: int) -> None:
        """Drops the records a run resuming at `step` writes again, so the file has no duplicate steps.

        Kept: records up to `step`, except final evaluations at or after it (a finished run evaluates again).
        Dropped too: a last line cut short by a kill. The file is replaced atomically. TensorBoard is told to
        discard its events after `step` the same way (a purge step on the first new event).
        """
        self.purge_step = step or None
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.read().splitlines()
        kept = [line for line in lines if _kept_on_resume(line, step)]
        if len(kept) == len(lines):
            return
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(self.path), suffix=".tmp", delete=False) as tmp:
            tmp.write("".join(line + "\n" for line in kept))
        os.replace(tmp.name, self.path)

    def flush(self) -> None:
        """Puts the pending TensorBoard events on disk (the JSON lines are written as they come)."""
        for events in self.event_writers.values():
            events.flush()

    def close(self) -> None:
        for events in self.event_writers.values():
            events.close()
        self.event_writers = {}

    def _event_writer(self, split: str) -> SummaryWriter:
        if split not in self.event_writers:
            purge = self.purge_step if split != "final_eval" else None
            self.event_writers[split] = SummaryWriter(
                os.path.join(self.tensorboard_dir, split), purge_step=purge, flush_secs=30
            )
        return self.event_writers[split]


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numbers by name (not its step, epoch or booleans): what TensorBoard and the plot draw."""
    return {
        name: float(value)
        for name, value in record.items()
        if name not in ("step", "epoch") and isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


def rgb_image(figure_or_array: Any) -> np.ndarray:
    """The [H, W, 3] pixels of a matplotlib figure (rendered with Agg, then closed) or of an array as it is."""
    if hasattr(figure_or_array, "canvas"):
        return np.moveaxis(figure_to_image(figure_or_array, close=True), 0, -1)
    return np.asarray(figure_or_array)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of <workdir>/metrics.jsonl, in order; a last line cut short by a kill is left out."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir!r} has no {METRICS_FILE}: not a train.py work directory?")
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not JSON ({error})") from error
    return records


def _kept_on_resume(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line stays when the run resumes at `step` (see MetricsWriter.rewind)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        return True
    limit = step - 1 if record.get("split") == "final_eval" else step
    return record["step"] <= limit
