"""Caption records and where they go: the JSON-lines / CSV output (appended per batch, read back to resume),
caption scores against references, and an HTML page with thumbnails.

A record is a dict, one per image:

    {"path": key, "labels": [{"label": name, "prob": p}, ...], "captions": [str, ...], "lm_label"?: name}
    {"path": key, "error": "ErrorType: message"}                      (a file that could not be read)

"lm_label" is present when the LM also classified the image (`lm_classify`). In CSV, one row per record with
the columns path, label_1, prob_1, ..., caption_1, ..., lm_label, error.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence

from PIL import Image

from imgllm.captions import caption_metrics, group_captions, read_captions_file
from imgllm.pipeline.inputs import Batch, Item

THUMBNAIL_SIZE = 128
RECORD_FORMATS = ("jsonl", "csv")


def format_for_path(path: str | None) -> str:
    """The record format an output path asks for: "csv" for a .csv file, else "jsonl"."""
    return "csv" if (path or "").lower().endswith(".csv") else "jsonl"


class RecordFile:
    """The output: JSON lines or CSV, appended per batch, read back for resuming (stdout when path is None)."""

    def __init__(self, path: str | None, fmt: str, top_labels: int, num_captions: int):
        if fmt not in RECORD_FORMATS:
            raise ValueError(f"the record format must be jsonl or csv, got {fmt!r}")
        self.path, self.format = path, fmt
        self.columns = (["path"] + [f"{kind}_{n}" for n in range(1, top_labels + 1) for kind in ("label", "prob")]
                        + [f"caption_{n}" for n in range(1, num_captions + 1)] + ["lm_label", "error"])
        self.stream = None

    def existing_records(self) -> list[dict]:
        """Records already in the output file (after dropping a partly written last line)."""
        if self.path is None or not os.path.exists(self.path):
            return []
        truncate_partial_line(self.path)
        with open(self.path, newline="", encoding="utf-8") as f:
            if self.format == "jsonl":
                return [json.loads(line) for line in f if line.strip()]
            return [self._from_row(row) for row in csv.DictReader(f)]

    def open(self) -> None:
        if self.path is None:
            self.stream = sys.stdout
            new = True
        else:
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            self.stream = open(self.path, "a", newline="", encoding="utf-8")
        if self.format == "csv" and new:
            csv.writer(self.stream, lineterminator="\n").writerow(self.columns)

    def write(self, records: Iterable[dict]) -> None:
        """Appends records and flushes: what is on disk is always whole lines, up to the last finished batch."""
        for record in records:
            if self.format == "jsonl":
                self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                csv.writer(self.stream, lineterminator="\n").writerow(self._to_row(record))
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.stream is not sys.stdout:
            self.stream.close()
        self.stream = None

    def _to_row(self, record: dict) -> list[str]:
        row = {"path": record["path"], "error": record.get("error", ""), "lm_label": record.get("lm_label", "")}
        for n, entry in enumerate(record.get("labels", ()), 1):
            row[f"label_{n}"], row[f"prob_{n}"] = entry["label"], f"{entry['prob']:.4f}"
        for n, caption in enumerate(record.get("captions", ()), 1):
            row[f"caption_{n}"] = " ".join(caption.split())  # one record per line, always
        return [row.get(column, "") for column in self.columns]

    @staticmethod
    def _from_row(row: dict) -> dict:
        if row.get("error"):
            return {"path": row["path"], "error": row["error"]}
        labels = [{"label": row[f"label_{n}"], "prob": float(row[f"prob_{n}"])}
                  for n in range(1, len(row)) if row.get(f"label_{n}")]
        captions = [row[f"caption_{n}"] for n in range(1, len(row)) if f"caption_{n}" in row]
        record = {"path": row["path"], "labels": labels, "captions": captions}
        if row.get("lm_label"):
            record["lm_label"] = row["lm_label"]
        return record


def truncate_partial_line(path: str) -> None:
    """Cuts a file after its last newline: an interrupted write leaves at most one partial last line."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        position = size
        while position > 0:
            step = min(65536, position)
            f.seek(position - step)
            chunk = f.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(position - step + newline + 1)
                return
            position -= step
        f.truncate(0)


def make_records(batch: Batch, outputs: Mapping, class_names: Sequence[str],
                 captions: list[list[str]]) -> list[dict]:
    """One record per real item of the batch (padding rows dropped), errors as {"path", "error"}.

    outputs: `caption_images`' outputs on the host (label_ids, label_probs, lm_label_ids when the LM classified);
    captions: per row, its decoded captions.
    """
    records = []
    for row, item in enumerate(batch.items):
        if row in batch.errors:
            records.append({"path": item.key, "error": batch.errors[row]})
            continue
        labels = [{"label": class_names[int(c)], "prob": round(float(p), 4)}
                  for c, p in zip(outputs["label_ids"][row], outputs["label_probs"][row])]
        record = {"path": item.key, "labels": labels, "captions": captions[row]}
        if "lm_label_ids" in outputs:  # the LM's own classification, beside the CNN's
            record["lm_label"] = class_names[int(outputs["lm_label_ids"][row])]
        records.append(record)
    return records


# ----------------------------------------------------------------------------------------------- scores


def score_records(records: Iterable[dict], references_path: str) -> dict:
    """Caption metrics of `records` against a references file, over the images it lists that were captioned.

    Scores each record's first caption (exact match, BLEU-4, CIDEr-D from `imgllm.captions`), and, where the
    reference lines carry a "label", the accuracy of the CNN's top label and of the LM's label (lm_classify).
    """
    paths, references, labels = group_captions(read_captions_file(references_path))
    by_path = {os.path.abspath(path): (refs, label) for path, refs, label in zip(paths, references, labels)}
    hypotheses, matched_refs, cnn_hits, lm_hits = [], [], [], []
    for record in records:
        reference = by_path.get(os.path.abspath(record["path"]))
        if reference is None or "error" in record:
            continue
        refs, label = reference
        hypotheses.append(record["captions"][0])
        matched_refs.append(refs)
        cnn_hits.append(record["labels"][0]["label"] == label)
        if "lm_label" in record:
            lm_hits.append(record["lm_label"] == label)
    if not hypotheses:
        return {"images": 0}
    scores = {"images": len(hypotheses), **caption_metrics(hypotheses, matched_refs),
              "cnn_accuracy": sum(cnn_hits) / len(cnn_hits)}
    if lm_hits:
        scores["lm_accuracy"] = sum(lm_hits) / len(lm_hits)
    return scores


# ----------------------------------------------------------------------------------------------- html


def thumbnail_data_uri(item: Item) -> str | None:
    """A small PNG of the image as a data: URI, or None when it cannot be read."""
    try:
        image = Image.fromarray(item.load(None))
    except Exception:  # noqa: BLE001 - the page shows the record's error instead
        return None
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    if max(image.size) < 64:  # CIFAR-size images: scale up so they are visible
        factor = 64 // max(image.size) + 1
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(path: str, records: Iterable[dict], items_by_key: Mapping[str, Item] | None = None) -> None:
    """A page with one row per record: embedded thumbnail, labels with probabilities, captions or the error.

    items_by_key: how to read each record's image (tfds items need theirs); a record without one is read as a file.
    """
    items_by_key = items_by_key or {}
    with open(path, "w", encoding="utf-8") as f:
        f.write("<!doctype html><meta charset='utf-8'><title>imgllm captions</title>\n<style>"
                "body{font-family:sans-serif}td{padding:6px;vertical-align:top;border-bottom:1px solid #ddd}"
                "img{image-rendering:pixelated}.error{color:#b00}</style>\n<table>\n")
        for record in records:
            item = items_by_key.get(record["path"], Item(record["path"]))
            uri = thumbnail_data_uri(item)
            image = f"<img src='{uri}' alt=''>" if uri else ""
            if "error" in record:
                text = f"<span class='error'>{html.escape(record['error'])}</span>"
            else:
                labels = ", ".join(f"{html.escape(e['label'])} {100 * e['prob']:.1f}%" for e in record["labels"])
                captions = "".join(f"<li>{html.escape(c)}</li>" for c in record["captions"])
                text = f"<b>{labels}</b><ul>{captions}</ul>"
            f.write(f"<tr><td>{image}</td><td><code>{html.escape(record['path'])}</code><br>{text}</td></tr>\n")
        f.write("</table>\n")


__all__ = ["RECORD_FORMATS", "RecordFile", "format_for_path", "make_records", "score_records", "thumbnail_data_uri",
           "truncate_partial_line", "write_html"]
