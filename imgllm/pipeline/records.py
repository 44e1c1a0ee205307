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

Beside an output file `<output>` a run keeps `<output>.lock` (`OutputLock`: one run at a time) and
`<output>.run.json` (the options that shaped its records: `prepare_output` refuses to resume with others).
Nothing read back is trusted: a line that is not a record is named by file and line number (`OutputError`).

Shard i of N of a run on `captions.jsonl` writes its part `captions.shard-0000i-of-0000N.jsonl` (`part_path`: the
format's suffix kept, so it is read, skipped in a folder and locked as any output), with its own lock and run options;
those add "shard" (index, count, images, batch size, inputs fingerprint) and "shard_paths" (its images' keys, in
the order it captions them), from which `merge_parts` (`imgllm.pipeline.batch`) puts the records back in input order.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import filelock

from imgllm.captions import caption_metrics, cider_note, group_captions, read_captions_file
from imgllm.pipeline.inputs import TFDS_PREFIX, Batch

RECORD_FORMATS = ("jsonl", "csv")
LOCK_SUFFIX = ".lock"  # <output>.lock: held by the run writing <output>
RUN_OPTIONS_SUFFIX = ".run.json"  # <output>.run.json: the options that shaped <output>'s records
NON_FINITE_ERROR = (
    "NonFiniteOutput: the model gave NaN or infinite probabilities or scores for this image "
    "(are the checkpoint's weights finite?)"
)
# Text files are written and read with this error handler: a file name that is not UTF-8 (legal on Linux) keeps its
# own bytes in CSV and run options, and reads back as the same name.
NAME_BYTES = "surrogateescape"
# CSV text cells (paths, labels, captions, errors) that begin so are formulas to spreadsheets: `spreadsheet_text`.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
TEXT_COLUMN = re.compile(r"^(path|error|lm_label|label_\d+|caption_\d+)$")
FIRST_LINE_LIMIT = 1 << 20  # bytes of an existing output read to recognise it as a records file
START_OVER = "pass --no-resume (resume=False) to start over"
SHARD_OPTIONS = ("shard", "shard_paths")  # what a part's run options add to an unsharded run's (`shard_run_options`)
PART_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)$")  # the tag `part_path` puts before an output's suffix


class OutputError(RuntimeError):
    """An output file (or a file beside it) cannot be used as asked: another run holds it, its records were made
    with other options, a line of it is not a record, or it cannot be written. The message is one line that names
    the file; infer.py prints it and exits with status 2."""


class OutputInUseError(OutputError):
    """Another run holds the output's lock (`OutputLock`)."""


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


def check_distinct_paths(written: Mapping[str, str | None], read: Mapping[str, Iterable[str]]) -> None:
    """Raises OutputError when two files a run writes (`written`: what -> path, None skipped) are one file, or one
    of them is a file it reads (`read`: what -> paths, e.g. the input images and the references): the page would
    replace the records, or the records an image. Paths are compared resolved (symlinks, "./", "..")."""
    seen: dict[str, str] = {}
    for what, path in written.items():
        if path is None:
            continue
        resolved = os.path.realpath(path)
        if resolved in seen:
            raise OutputError(f"{what} {path} is the same file as {seen[resolved]}: give each its own path")
        seen[resolved] = f"{what} {path}"
    for what, paths in read.items():
        for path in paths:
            clash = seen.get(os.path.realpath(path))
            if clash is not None:
                raise OutputError(f"{clash} is also {what} {path}: imgllm does not write over what it reads")


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


# ----------------------------------------------------------------------------------------------- beside the output


class OutputLock:
    """An exclusive, non-blocking lock on an output file for one run, from its start to its end (a context manager).

    The lock is a `filelock.FileLock` (flock on Unix, the Windows API on Windows, so `imgllm.pipeline` imports on
    every platform) on the sibling file `<output>.lock`, not on the output: resuming with retry_errors replaces the
    output (os.replace) and resume=False deletes it, and a lock on a replaced file excludes nobody. A second run
    raises OutputInUseError naming the holder's pid, which the lock file holds; the file is removed on release, and
    filelock makes a run that opened it just before its removal lock a new one, so two runs never both hold it. A
    symbolic link, a special file or a hard-linked file at the lock's path is refused, never followed or written.
    The kernel drops a dead process's lock: a killed run leaves a lock file but no lock.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        *,
        path: str | None = None,
        advice: str = "wait for it to end, or write another output",
    ):
        """output: what the lock guards (named in errors); path: the lock file (default `<output>.lock`); advice:
        what the error tells a second run to do."""
        self.output = os.fspath(output)
        self.path = self.output + LOCK_SUFFIX if path is None else path
        self.advice = advice
        self.lock: filelock.FileLock | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock now or raises OutputInUseError (another run holds it) or OutputError (it cannot be used)."""
        if self.lock is not None:
            return
        refuse_planted_lock_file(self.path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            lock = filelock.FileLock(self.path, timeout=0, thread_local=False, on_acquired=self._claim)
            lock.acquire()
        except filelock.Timeout:
            raise OutputInUseError(
                f"{self.output} is in use by another run ({lock_holder(self.path)} holds {self.path}); {self.advice}"
            ) from None
        except OutputError:
            raise
        except OSError as error:
            if error.errno == errno.ELOOP:
                refuse_planted_lock_file(self.path)
            raise OutputError(f"cannot lock {self.path}: {error.strerror or error}") from error
        self.lock = lock

    def _claim(self, fd: int) -> None:
        """filelock's on_acquired: refuses a file that is not a lock file of imgllm's, else writes our pid in it."""
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:
            raise OutputError(
                f"{self.path} is not a lock file of imgllm's (a special file, or a file with other "
                "names): it is left alone; remove it to use this output"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        """Removes the lock file, then unlocks; nothing when not held."""
        if self.lock is None:
            return
        try:
            with contextlib.suppress(OSError):  # gone already; Windows: removed by filelock once unlocked
                os.remove(self.path)
        finally:
            self.lock.release(force=True)
            self.lock = None


def refuse_planted_lock_file(path: str) -> None:
    """Raises OutputError when `path` is a symbolic link, a special file or a file with other names (hard links):
    something planted where imgllm's lock file goes, which is never followed or written."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(status.st_mode):
        raise OutputError(
            f"{path} is a symbolic link, not a lock file of imgllm's: it is not followed; remove it to use this output"
        )
    if not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:
        raise OutputError(
            f"{path} is not a lock file of imgllm's (a special file, or a file with other names): it "
            "is left alone; remove it to use this output"
        )


def lock_holder(path: str) -> str:
    """ "pid N" from a lock file's content, or "a process" when it holds no pid (not written yet, gone, or not ours)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return "a process"
    try:
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return f"pid {text}" if text.isdigit() else "a process"


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fails now, not after the captioning, when `path` cannot be written: creates its directory and opens it for
    appending (a file the check creates is removed again). Raises OutputError naming `what` and the path."""
    path = os.fspath(path)
    existed = os.path.lexists(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise OutputError(f"cannot write {what} {path}: {error.strerror or error}") from error
    if not existed:
        os.remove(path)


def read_run_options(path: str) -> dict | None:
    """The run options recorded in `path` (`write_run_options`), or None when there is no such file."""
    try:
        with open(path, encoding="utf-8", errors=NAME_BYTES) as f:
            options = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise OutputError(f"{path}: not a run options file ({error}); delete it to resume, or {START_OVER}") from None
    if not isinstance(options, dict):
        raise OutputError(f"{path}: not a run options file (not a JSON object); delete it to resume, or {START_OVER}")
    return options


def write_run_options(path: str, options: Mapping[str, Any]) -> None:
    """Writes the options as JSON to `path`, atomically (`write_atomically`)."""
    write_atomically(path, lambda f: f.write(json.dumps(dict(options), indent=1, ensure_ascii=False) + "\n"))


def write_atomically(path: str, write: Callable[[Any], Any]) -> None:
    """Writes a text file through write(stream) into a temporary file beside `path`, flushed to disk, that then
    replaces `path` (os.replace): a kill at any moment leaves the old file or the new one, whole. The new file
    keeps the old one's permissions (0o644 for a new one; mkstemp's own are 0o600). A symlink at `path` stays a
    link: the file it points to is the one replaced."""
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8", errors=NAME_BYTES) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def changed_run_options(
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    informational: Collection[str] = ("checkpoint", "cwd", "shard_paths"),
) -> list[str]:
    """ "NAME was OLD, now NEW" for each option that differs (absent on one side: "unset"), in `current`'s order.

    informational: keys recorded for the reader, not compared ("checkpoint", its path: a moved checkpoint is the
    same checkpoint, its "checkpoint_id" says whether the weights are; "cwd", the folder relative paths start in;
    "shard_paths", a part's keys, which its "shard" fingerprints)."""

    def shown(options: Mapping[str, Any], name: str) -> str:
        return json.dumps(options[name], ensure_ascii=False) if name in options else "unset"

    unset = object()
    names = [name for name in dict.fromkeys([*current, *recorded]) if name not in informational]
    return [
        f"{name} was {shown(recorded, name)}, now {shown(current, name)}"
        for name in names
        if recorded.get(name, unset) != current.get(name, unset)
    ]


def check_run_options(output: str, recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Raises OutputError when `output`'s records were made with options other than `current`: resuming would mix
    records of two runs in one file. recorded None (an output written before run options were kept): no check."""
    if recorded is None:
        return
    paths = f" (checkpoint was {recorded.get('checkpoint')}, now {current.get('checkpoint')})"
    changes = [
        change + paths if change.startswith("checkpoint_id ") else change
        for change in changed_run_options(recorded, current)
    ]
    if changes:
        raise OutputError(
            f"{output} was written with other options ({'; '.join(changes)}): resume with the same "
            f"options, or {START_OVER}"
        )


def prepare_output(
    record_file: RecordFile, options: Mapping[str, Any], *, resume: bool, retry: Collection[str] = ()
) -> list[dict]:
    """Readies an output file for a run with `options` (those that shape records, recorded beside it in
    `<output>.run.json`) and returns the records it keeps, which the run does not redo.

    A file that is not a records file is refused first (`check_recognised_output`): nothing is modified.
    resume=False: the file starts over, emptied when `RecordFile.open` is called (after compiling: a run that fails
    before leaves the old records and run options as they were). resume: its records are read
    (`RecordFile.existing_records`) and refused if made with other options (`check_run_options`); the error records
    of the paths in `retry` are removed from it (`RecordFile.rewrite`, atomic) so that those images are captioned
    again. A file without records starts over too (a CSV header of other columns would stay). Call it while holding
    the `OutputLock`.
    """
    check_recognised_output(record_file.path, record_file.format)
    previous = record_file.existing_records() if resume else []
    if previous:
        recorded = read_run_options(record_file.path + RUN_OPTIONS_SUFFIX)
        check_run_options(record_file.path, recorded, options)
        record_file.written_from = (recorded or {}).get("cwd") or os.getcwd()
        retry = {path_identity(key, os.getcwd()) for key in retry}
        kept = [
            record
            for record in previous
            if not ("error" in record and path_identity(record["path"], record_file.written_from) in retry)
        ]
        if len(kept) < len(previous):
            record_file.rewrite(kept)
        write_run_options(record_file.path + RUN_OPTIONS_SUFFIX, options)
        return kept
    record_file.start_over = dict(options)  # the old file stays until the first records are written (`open`)
    return []


# ----------------------------------------------------------------------------------------------- shards and parts


def part_path(output: str | os.PathLike, shard: tuple[int, int]) -> str:
    """The part of `output` that shard (i, N) writes: ".shard-IIIII-of-NNNNN" (zero-padded to 5 digits or more)
    before the output's suffix, e.g. captions.jsonl → captions.shard-00003-of-00010.jsonl, so that it keeps its
    format and is skipped as a sidecar file in a folder of images."""
    index, count = shard
    stem, suffix = os.path.splitext(os.fspath(output))
    return f"{stem}.shard-{index:05d}-of-{count:05d}{suffix}"


def find_parts(output: str | os.PathLike) -> dict[tuple[int, int], str]:
    """The parts of `output` on disk (`part_path`), by (i, N): files beside it named as a shard of it."""
    output = os.fspath(output)
    directory = os.path.dirname(output)
    stem, suffix = os.path.splitext(os.path.basename(output))
    try:
        names = os.listdir(directory or os.curdir)
    except OSError:
        return {}
    parts = {}
    for name in names:
        if not (name.startswith(stem) and name.endswith(suffix)):
            continue
        match = PART_NAME.fullmatch(name[len(stem) : len(name) - len(suffix)])
        shard = match and (int(match.group(1)), int(match.group(2)))
        if shard and shard[0] < shard[1] and part_path(output, shard) == os.path.join(directory, name):
            parts[shard] = os.path.join(directory, name)
    return parts


def shard_run_options(
    options: Mapping[str, Any], shard: tuple[int, int], *, batch_size: int, inputs: str, paths: Sequence[str]
) -> dict[str, Any]:
    """A part's run options: an unsharded run's `options`, plus "shard" (compared on resume: index, count, its
    number of images, the batch size that cut the input list and the list's fingerprint `inputs`) and
    "shard_paths" (its images' keys in the order it captions them; read by `merge_parts`, not compared)."""
    index, count = shard
    return {
        **options,
        "shard": {"index": index, "count": count, "images": len(paths), "batch_size": batch_size, "inputs": inputs},
        "shard_paths": list(paths),
    }


def unsharded_run_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A part's run options less what the shard added (`shard_run_options`): what one unsharded run records."""
    return {name: value for name, value in options.items() if name not in SHARD_OPTIONS}


def part_shard_problem(options: Mapping[str, Any] | None, shard: tuple[int, int]) -> str | None:
    """Why a part's run options are not those of shard (i, N) (`shard_run_options`), or None when they are."""
    if options is None:
        return "has no run options"
    recorded = options.get("shard")
    paths = options.get("shard_paths")
    if not isinstance(recorded, dict) or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return "has no shard in its run options"
    if (recorded.get("index"), recorded.get("count")) != tuple(shard) or recorded.get("images") != len(paths):
        return (
            f"records shard {recorded.get('index')}/{recorded.get('count')} of {recorded.get('images')} images, "
            f"not {shard[0]}/{shard[1]}"
        )
    counts = [recorded.get("batch_size"), options.get("top_labels"), options.get("num_captions")]
    if options.get("format") not in RECORD_FORMATS or not all(type(n) is int and n >= 1 for n in counts):
        return "has run options without its format, batch size, labels or captions per image"
    return None


def part_positions(part: str, records: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> list[int]:
    """Each record's position among its part's `paths` ("shard_paths": records are written with these keys), in
    record order. Raises OutputError naming the part and the record when it is not one of them, or repeated."""
    where = {path: position for position, path in enumerate(paths)}
    positions, seen = [], set()
    for record in records:
        position = where.get(record["path"])
        if position is None or position in seen:
            problem = "is not one of its shard's images" if position is None else "is there twice"
            raise OutputError(
                f"{part}: the record of {record['path']!r} {problem}; rerun that shard with --no-resume (resume=False)"
            )
        seen.add(position)
        positions.append(position)
    return positions


def path_identity(key: str, cwd: str) -> str:
    """The image a record's "path" names, to match records with inputs however the path was written ("imgs/a.png",
    "./imgs//a.png", "/abs/imgs/a.png", a link): a file path resolved from `cwd`, the working directory of the run
    that wrote it; a tfds key as it is."""
    if key.startswith(TFDS_PREFIX):
        return key
    return os.path.realpath(os.path.join(cwd, key))


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
    "LOCK_SUFFIX",
    "NAME_BYTES",
    "NON_FINITE_ERROR",
    "OutputError",
    "OutputInUseError",
    "OutputLock",
    "RECORD_FORMATS",
    "RUN_OPTIONS_SUFFIX",
    "RecordFile",
    "SHARD_OPTIONS",
    "changed_run_options",
    "check_distinct_paths",
    "check_recognised_output",
    "check_run_options",
    "check_writable",
    "find_parts",
    "format_for_path",
    "json_line",
    "lm_label_comparable",
    "make_records",
    "numbers_are_finite",
    "part_path",
    "part_positions",
    "part_shard_problem",
    "path_identity",
    "plain_text",
    "prepare_output",
    "read_references",
    "read_run_options",
    "recognised_output",
    "record_problem",
    "reference_for",
    "score_records",
    "shard_run_options",
    "spreadsheet_text",
    "truncate_partial_line",
    "unsharded_run_options",
    "whole_lines",
    "write_atomically",
    "write_run_options",
]
