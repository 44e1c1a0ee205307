"""Caption records and where they go: the JSON-lines / CSV output (appended per batch, read back to resume),
and caption scores against references (the HTML page is `imgllm.pipeline.gallery`).

A record is a dict, one per image:

    {"path": key, "labels": [{"label": name, "prob": p}, ...], "captions": [str, ...], "caption_scores": [s, ...],
     "lm_label"?: name, "lm_probs"?: {name: p, ...}}
    {"path": key, "error": "ErrorType: message"}                      (a file that could not be read)

"labels" are the top classes with their calibrated probabilities, from the classifier the run chose (the CNN, the
LM or both fused). "caption_scores" are the captions' log-probabilities under the LM (the sum over their tokens; for
beam search the length-normalised beam score), so several captions of an image can be ranked. "lm_label" and
"lm_probs" are present when the LM classified the image (`lm_classify`, `lm_labels`, or an LM or fused
classifier): its label, and the calibrated probability of every label it scored. In CSV, one row per record
with the columns path, label_1, prob_1, ..., caption_1, score_1, ..., lm_label, lm_prob (the LM label's
probability), error.

What is kept beside an output file (its lock, its run options, the parts of a sharded run) and how files are
replaced atomically: `imgllm.pipeline.outputs`. Nothing read back is trusted: a line that is not a record is named by
file and line number (`OutputError`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from imgllm.captions import caption_metrics, cider_note, group_captions, read_captions_file
from imgllm.pipeline.inputs import Batch
from imgllm.pipeline.outputs import (
    NAME_BYTES,
    RUN_OPTIONS_SUFFIX,
    START_OVER,
    OutputError,
    write_atomically,
    write_run_options,
)

RECORD_FORMATS = ("jsonl", "csv")
NON_FINITE_ERROR = (
    "NonFiniteOutput: the model gave NaN or infinite probabilities or scores for this image "
    "(are the checkpoint's weights finite?)"
)
# CSV text cells (paths, labels, captions, errors) that begin so are formulas to spreadsheets: `spreadsheet_text`.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
TEXT_COLUMN = re.compile(r"^(path|error|lm_label|label_\d+|caption_\d+)$")
FIRST_LINE_LIMIT = 1 << 20  # bytes of an existing output read to recognise it as a records file


def format_for_path(path: str | None) -> str:
    """The record format an output path asks for: "csv" for a .csv file, else "jsonl"."""
    return "csv" if (path or "").lower().endswith(".csv") else "jsonl"


class RecordFile:
    """The output: JSON lines or CSV, appended per batch, read back for resuming (stdout when path is None)."""

    def __init__(self, path: str | None, fmt: str, top_labels: int, num_captions: int):
        if fmt not in RECORD_FORMATS:
            raise ValueError(f"the record format must be jsonl or csv, got {fmt!r}")
        self.path, self.format = path, fmt
        self.columns = (
            ["path"]
            + [f"{kind}_{n}" for n in range(1, top_labels + 1) for kind in ("label", "prob")]
            + [f"{kind}_{n}" for n in range(1, num_captions + 1) for kind in ("caption", "score")]
            + ["lm_label", "lm_prob", "error"]
        )
        self.stream = None
        self.written_from = os.getcwd()  # the working directory its records' relative paths start from
        self.start_over: dict | None = None  # the run options of an output that `open` empties (`prepare_output`)

    def check_recognised(self) -> None:
        """Raises OutputError unless an existing file at the path is a records file (`check_recognised_output`)."""
        check_recognised_output(self.path, self.format)

    def existing_records(self) -> list[dict]:
        """Records already in the output file; a partly written last line (a run killed mid-write) is dropped from
        the file once every whole line has been read as a record.

        Raises OutputError naming the file and line of any other line that is not a record (the file untouched)."""
        records = self.read_records()
        if self.path is not None and os.path.exists(self.path):
            truncate_partial_line(self.path)
        return records

    def read_records(self) -> list[dict]:
        """The whole records of the output file ([] when there is none), the file untouched: a partly written last
        line is left out. Raises OutputError naming the file and line of any other line that is not a record."""
        if self.path is None or not os.path.exists(self.path):
            return []
        return self._read_jsonl() if self.format == "jsonl" else self._read_csv()

    def _read_jsonl(self) -> list[dict]:
        records = []
        with open(self.path, "rb") as f:
            for number, line in enumerate(whole_lines(f), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise self._bad_line(number, f"not JSON ({error.msg} at column {error.colno})") from None
                except UnicodeDecodeError as error:
                    raise self._bad_line(number, f"not UTF-8 text ({error.reason})") from None
                problem = record_problem(record)
                if problem:
                    raise self._bad_line(number, problem)
                records.append(record)
        return records

    def _read_csv(self) -> list[dict]:
        records = []
        with open(self.path, newline="", encoding="utf-8", errors=NAME_BYTES) as f:
            reader = csv.DictReader(whole_lines(f))
            try:
                for row in reader:
                    record = self._from_row(row)
                    problem = record_problem(record)
                    if problem:
                        raise self._bad_line(reader.line_num, problem)
                    records.append(record)
            except (csv.Error, ValueError, KeyError, TypeError) as error:  # a cell that is not what its column says
                raise self._bad_line(reader.line_num, f"not a record row ({type(error).__name__}: {error})") from None
        return records

    def _bad_line(self, number: int, problem: str) -> OutputError:
        return OutputError(f"{self.path}, line {number}: {problem}; fix or delete that line to resume, or {START_OVER}")

    def rewrite(self, records: Sequence[dict]) -> None:
        """Replaces the file's content by `records`, atomically (`write_atomically`): a kill at any moment leaves
        the old file or the new one, whole."""

        def write_records(stream) -> None:
            if self.format == "csv":
                csv.writer(stream, lineterminator="\n").writerow(self.columns)
            self._write_to(stream, records)

        write_atomically(self.path, write_records)

    def open(self) -> None:
        """Opens the output for appending; one that starts over (`prepare_output`) is emptied now and its run
        options written."""
        if self.path is None:
            self.stream = sys.stdout
            new = True
        else:
            new = self.start_over is not None or not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            if self.start_over is not None:
                write_run_options(self.path + RUN_OPTIONS_SUFFIX, self.start_over)
            self.stream = open(
                self.path, "w" if self.start_over is not None else "a", newline="", encoding="utf-8", errors=NAME_BYTES
            )
            self.start_over = None
        if self.format == "csv" and new:
            csv.writer(self.stream, lineterminator="\n").writerow(self.columns)

    def write(self, records: Iterable[dict]) -> None:
        """Appends records and flushes: what is on disk is always whole lines, up to the last finished batch."""
        self._write_to(self.stream, records)
        self.stream.flush()

    def _write_to(self, stream, records: Iterable[dict]) -> None:
        for record in records:
            if self.format == "jsonl":
                stream.write(json_line(record))
            else:
                csv.writer(stream, lineterminator="\n").writerow(self._to_row(record))

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
        for n, score in enumerate(record.get("caption_scores", ()), 1):
            row[f"score_{n}"] = f"{score:.4f}"
        if "lm_label" in record and record["lm_label"] in record.get("lm_probs", {}):
            row["lm_prob"] = f"{record['lm_probs'][record['lm_label']]:.4f}"
        return [
            spreadsheet_text(row.get(column, "")) if TEXT_COLUMN.match(column) else row.get(column, "")
            for column in self.columns
        ]

    @staticmethod
    def _from_row(row: dict) -> dict:
        row = {
            key: plain_text(value)
            if isinstance(key, str) and TEXT_COLUMN.match(key) and isinstance(value, str)
            else value
            for key, value in row.items()
        }
        if row.get("error"):
            return {"path": row["path"], "error": row["error"]}
        labels = [
            {"label": row[f"label_{n}"], "prob": float(row[f"prob_{n}"])}
            for n in range(1, len(row))
            if row.get(f"label_{n}")
        ]
        captions = [row[f"caption_{n}"] for n in range(1, len(row)) if f"caption_{n}" in row]
        record = {"path": row["path"], "labels": labels, "captions": captions}
        scores = [float(row[f"score_{n}"]) for n in range(1, len(captions) + 1) if row.get(f"score_{n}")]
        if scores:
            record["caption_scores"] = scores
        if row.get("lm_label"):
            record["lm_label"] = row["lm_label"]
            if row.get("lm_prob"):
                record["lm_probs"] = {row["lm_label"]: float(row["lm_prob"])}  # CSV keeps the label's alone
        return record


def spreadsheet_text(cell: str) -> str:
    """A CSV text cell that spreadsheets show and never run: one beginning with =, +, -, @, tab or carriage return
    (a formula to Excel, LibreOffice and Sheets), or with the quote added here, gets a leading "'" (`plain_text`
    removes it when the file is read back)."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def plain_text(cell: str) -> str:
    """A CSV text cell as it was before `spreadsheet_text`."""
    return cell[1:] if cell.startswith("'") else cell


def json_line(record: Mapping[str, Any]) -> str:
    """A record as one line of JSON (never NaN). A file name that is not UTF-8 (its bytes held as surrogates, as
    os.fsdecode gives them) is written as \\udcXX escapes, which read back to the same name."""
    line = json.dumps(record, ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(record, ensure_ascii=True, allow_nan=False)
    return line + "\n"


def whole_lines(stream: Iterable) -> Iterator:
    """The lines of a file that end with a newline: a last line without one is a write cut short."""
    newline = None
    for line in stream:
        newline = newline or ("\n" if isinstance(line, str) else b"\n")
        if line.endswith(newline):
            yield line


def recognised_output(path: str, fmt: str) -> bool:
    """Whether the existing output `path` is a file imgllm may append to, rewrite or delete: a regular file that is
    empty, has run options beside it (`RUN_OPTIONS_SUFFIX`), or begins with a record (JSON lines) or the records'
    header (CSV). Anything else (a photo named by mistake, a device, a folder) is not imgllm's."""
    if not os.path.isfile(path):
        return False
    if os.path.getsize(path) == 0 or os.path.isfile(path + RUN_OPTIONS_SUFFIX):
        return True
    with open(path, "rb") as f:
        first = f.readline(FIRST_LINE_LIMIT)
    if fmt == "csv":
        return first.startswith(b"path,")
    try:
        return record_problem(json.loads(first)) is None
    except ValueError:
        return False


def check_recognised_output(path: str, fmt: str) -> None:
    """Raises OutputError unless an existing output is imgllm's (`recognised_output`): nothing is modified before."""
    if os.path.exists(path) and not recognised_output(path, fmt):
        raise OutputError(
            f"{path} exists and is not a {fmt} records file (its first line is not a record); imgllm "
            "modifies only its own outputs: choose another output, or move that file away"
        )


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


def record_problem(record: Any) -> str | None:
    """What makes `record` read from an output not a record (module docstring), or None when it is one: the page
    and scores index into records, so a wrong shape is caught where the file and line can still be named."""
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return 'not a record (a JSON object with a "path" string)'
    if "error" in record:
        return None if isinstance(record["error"], str) else '"error" is not a string'
    labels, captions = record.get("labels"), record.get("captions")
    if not isinstance(labels, list) or not all(isinstance(e, dict) and {"label", "prob"} <= e.keys() for e in labels):
        return 'not a record ("labels" is not a list of {"label", "prob"})'
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return 'not a record ("captions" is not a list of strings)'
    number = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    scores = record.get("caption_scores", [])
    if not isinstance(scores, list) or not all(number(score) for score in scores):
        return 'not a record ("caption_scores" is not a list of numbers)'
    lm_probs = record.get("lm_probs", {})
    if not isinstance(lm_probs, dict) or not all(number(p) for p in lm_probs.values()):
        return 'not a record ("lm_probs" is not an object of numbers)'
    if "lm_label" in record and not isinstance(record["lm_label"], str):
        return 'not a record ("lm_label" is not a string)'
    return None


def make_records(
    batch: Batch,
    outputs: Mapping,
    class_names: Sequence[str],
    captions: list[list[str]],
    *,
    lm_label_names: Sequence[str] | None = None,
) -> list[dict]:
    """One record per real item of the batch (padding rows dropped), errors as {"path", "error"}.

    outputs: `caption_images`' outputs on the host (label_ids, label_probs, caption_scores; lm_label_ids and
    lm_probs when the LM classified); captions: per row, its decoded captions; lm_label_names: the labels the LM
    scored (None: class_names).
    """
    lm_label_names = class_names if lm_label_names is None else lm_label_names
    records = []
    for row, item in enumerate(batch.items):
        if row in batch.errors:
            records.append({"path": item.key, "error": batch.errors[row]})
            continue
        labels = [
            {"label": class_names[int(c)], "prob": round(float(p), 4)}
            for c, p in zip(outputs["label_ids"][row], outputs["label_probs"][row])
        ]
        record = {"path": item.key, "labels": labels, "captions": captions[row]}
        if "caption_scores" in outputs:
            record["caption_scores"] = [round(float(score), 4) for score in outputs["caption_scores"][row]]
        if "lm_label_ids" in outputs:  # the LM's own classification, beside the CNN's
            record["lm_label"] = lm_label_names[int(outputs["lm_label_ids"][row])]
            record["lm_probs"] = {name: round(float(p), 4) for name, p in zip(lm_label_names, outputs["lm_probs"][row])}
        records.append(record if numbers_are_finite(record) else {"path": item.key, "error": NON_FINITE_ERROR})
    return records


def numbers_are_finite(record: Mapping[str, Any]) -> bool:
    """Whether every probability and score of a record is a finite number (what JSON can hold)."""
    numbers = [entry["prob"] for entry in record.get("labels", ())] + list(record.get("caption_scores", ()))
    return all(math.isfinite(number) for number in numbers + list(record.get("lm_probs", {}).values()))


# ----------------------------------------------------------------------------------------------- scores


def read_references(path: str) -> dict[str, dict]:
    """The references of a captions file (JSON lines {"path", "caption", "label"?}, paths relative to its folder)
    by absolute image path: {"captions": [str, ...], "label": str}.

    The label is the line's "label", or else the name of the image's folder (`group_captions`), as `score_records`
    scores label accuracy. Raises `CaptionFileError` (a ValueError) naming the file and line of a bad line."""
    paths, captions, labels = group_captions(read_captions_file(path))
    return {path: {"captions": list(refs), "label": label} for path, refs, label in zip(paths, captions, labels)}


def reference_for(references: Mapping[str, dict] | None, record_path: str) -> dict | None:
    """The reference of the record whose "path" is `record_path`, or None: records and references are matched by
    absolute path (as `score_records` matches them), so a record of "imgs/a.png" run from the references' folder
    finds the reference line "imgs/a.png" there."""
    if not references:
        return None
    return references.get(os.path.abspath(record_path))


def lm_label_comparable(
    record: Mapping[str, Any], reference: Mapping[str, Any], lm_label_names: Sequence[str] | None = None
) -> bool:
    """Whether the record's LM label can be compared with the reference's label: the record has one, and the LM
    chose among the checkpoint's classes (`lm_label_names` None) or among labels that hold the reference's (an LM
    asked for colours is not wrong because the reference names a shape)."""
    if "lm_label" not in record or not reference.get("label"):
        return False
    return lm_label_names is None or reference["label"] in lm_label_names


def score_records(
    records: Iterable[dict], references_path: str, *, lm_label_names: Sequence[str] | None = None
) -> dict:
    """Caption metrics of `records` against a references file, over the images it lists that were captioned.

    Scores each record's first caption (exact match, BLEU-4, CIDEr-D, ROUGE-L from `imgllm.captions`), and, where the
    reference lines carry a "label", the accuracy of the CNN's top label and of the LM's label (lm_classify).
    lm_label_names: the labels the LM chose among (`PipelineSpec.lm_label_names`; None: the checkpoint's classes);
    the LM's label is scored only against references whose label is one of them (`lm_label_comparable`).
    CIDEr-D of fewer than two images is None, and "cider_note" says why.
    """
    references = read_references(references_path)
    hypotheses, matched_refs, cnn_hits, lm_hits = [], [], [], []
    for record in records:
        reference = reference_for(references, record["path"])
        if reference is None or "error" in record:
            continue
        hypotheses.append(record["captions"][0])
        matched_refs.append(reference["captions"])
        cnn_hits.append(record["labels"][0]["label"] == reference["label"])
        if lm_label_comparable(record, reference, lm_label_names):
            lm_hits.append(record["lm_label"] == reference["label"])
    if not hypotheses:
        return {"images": 0}
    scores = {
        "images": len(hypotheses),
        **caption_metrics(hypotheses, matched_refs),
        "cnn_accuracy": sum(cnn_hits) / len(cnn_hits),
    }
    if note := cider_note(len(hypotheses)):
        scores.update(cider=None, cider_note=note)
    if lm_hits:
        scores["lm_accuracy"] = sum(lm_hits) / len(lm_hits)
    return scores


__all__ = [
    "FIRST_LINE_LIMIT",
    "NON_FINITE_ERROR",
    "RECORD_FORMATS",
    "RecordFile",
    "check_recognised_output",
    "format_for_path",
    "json_line",
    "lm_label_comparable",
    "make_records",
    "numbers_are_finite",
    "plain_text",
    "read_references",
    "recognised_output",
    "record_problem",
    "reference_for",
    "score_records",
    "spreadsheet_text",
    "truncate_partial_line",
    "whole_lines",
]
