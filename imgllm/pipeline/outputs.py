"""Output bookkeeping: what a run keeps beside its records file, and how it writes files it may replace.

Beside an output file `<output>` a run keeps `<output>.lock` (`OutputLock`: one run at a time) and
`<output>.run.json` (the options that shaped its records: `prepare_output` refuses to resume with others,
`changed_run_options` names the differences). Files that replace others (a records file rewritten without some error
records, run options, the HTML pages) are written atomically (`write_atomically`). Nothing read back is trusted: run
options that are not a JSON object are named by file (`OutputError`).

Shard i of N of a run on `captions.jsonl` writes its part `captions.shard-0000i-of-0000N.jsonl` (`part_path`: the
format's suffix kept, so it is read, skipped in a folder and locked as any output), with its own lock and run options;
those add "shard" (index, count, images, batch size, inputs fingerprint) and "shard_paths" (its images' keys, in
the order it captions them), from which `merge_parts` (`imgllm.pipeline.batch`) puts the records back in input order.
The inputs are listed while the part is captioned: its run options hold the shard's index, count and batch size from
the start, and its images, fingerprint and paths once the listing has ended; merge refuses a part without them.

The records themselves, their formats and how a records file is read back: `imgllm.pipeline.records`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import filelock

from imgllm.pipeline.inputs import TFDS_PREFIX

LOCK_SUFFIX = ".lock"  # <output>.lock: held by the run writing <output>
RUN_OPTIONS_SUFFIX = ".run.json"  # <output>.run.json: the options that shaped <output>'s records
# Text files are written and read with this error handler: a file name that is not UTF-8 (legal on Linux) keeps its
# own bytes in CSV and run options, and reads back as the same name.
NAME_BYTES = "surrogateescape"
START_OVER = "pass --no-resume (resume=False) to start over"
SHARD_OPTIONS = ("shard", "shard_paths")  # what a part's run options add to an unsharded run's (`shard_run_options`)
PART_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)$")  # the tag `part_path` puts before an output's suffix


class OutputError(RuntimeError):
    """An output file (or a file beside it) cannot be used as asked: another run holds it, its records were made
    with other options, a line of it is not a record, or it cannot be written. The message is one line that names
    the file; infer.py prints it and exits with status 2."""


class OutputInUseError(OutputError):
    """Another run holds the output's lock (`OutputLock`)."""


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
    records of two runs in one file. recorded None (an output written before run options were kept): no check.
    A part's input list is compared only when both sides hold it (`shard_run_options`: a run records it once it has
    listed its inputs)."""
    if recorded is None:
        return
    if not (listed_shard(recorded) and listed_shard(current)):
        recorded, current = started_shard(recorded), started_shard(current)
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
    record_file: Any,
    options: Mapping[str, Any],
    *,
    resume: bool,
    retry: Collection[str] | Callable[[], Iterable[str]] = (),
) -> list[dict]:
    """Readies an output file for a run with `options` (those that shape records, recorded beside it in
    `<output>.run.json`) and returns the records it keeps, which the run does not redo. record_file: an
    `imgllm.pipeline.records.RecordFile` (not imported here: records.py builds on this module).

    A file that is not a records file is refused first (`RecordFile.check_recognised`): nothing is modified.
    resume=False: the file starts over, emptied when `RecordFile.open` is called (after compiling: a run that fails
    before leaves the old records and run options as they were). resume: its records are read
    (`RecordFile.existing_records`) and refused if made with other options (`check_run_options`); the error records
    of the paths in `retry` (or that retry() gives, asked only when there are error records) are removed from it
    (`RecordFile.rewrite`, atomic) so that those images are captioned again. A file without records starts over too
    (a CSV header of other columns would stay). Call it while holding the `OutputLock`.
    """
    record_file.check_recognised()
    previous = record_file.existing_records() if resume else []
    if previous:
        recorded = read_run_options(record_file.path + RUN_OPTIONS_SUFFIX)
        check_run_options(record_file.path, recorded, options)
        record_file.written_from = (recorded or {}).get("cwd") or os.getcwd()
        failed = any("error" in record for record in previous)
        retried = {path_identity(key, os.getcwd()) for key in (retry() if callable(retry) else retry)} if failed else ()
        kept = [
            record
            for record in previous
            if not ("error" in record and path_identity(record["path"], record_file.written_from) in retried)
        ]
        if len(kept) < len(previous):
            record_file.rewrite(kept)
        write_run_options(record_file.path + RUN_OPTIONS_SUFFIX, options)
        return kept
    record_file.start_over = dict(options)  # the old file stays until the first records are written (`open`)
    return []


def check_distinct_paths(written: Mapping[str, str | None], read: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Raises OutputError when two files a run writes (`written`: what -> path, None skipped) are one file, or one
    of them is a file it reads (`read`: what -> paths, e.g. the input images and the references): the page would
    replace the records, or the records an image. Paths are compared resolved (symlinks, "./", "..").
    Returns the files written, resolved, for `refuse_written` to check what is read later (a stream of inputs)."""
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
            refuse_written(seen, what, path)
    return seen


def refuse_written(written: Mapping[str, str], what: str, path: str) -> None:
    """Raises OutputError when `path` (read as `what`) is one of the files `written` (`check_distinct_paths`)."""
    clash = written.get(os.path.realpath(path)) if written else None
    if clash is not None:
        raise OutputError(f"{clash} is also {what} {path}: imgllm does not write over what it reads")


def path_identity(key: str, cwd: str) -> str:
    """The image a record's "path" names, to match records with inputs however the path was written ("imgs/a.png",
    "./imgs//a.png", "/abs/imgs/a.png", a link): a file path resolved from `cwd`, the working directory of the run
    that wrote it; a tfds key as it is."""
    if key.startswith(TFDS_PREFIX):
        return key
    return os.path.realpath(os.path.join(cwd, key))


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
    options: Mapping[str, Any],
    shard: tuple[int, int],
    *,
    batch_size: int,
    inputs: str | None = None,
    paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A part's run options: an unsharded run's `options`, plus "shard" (compared on resume: index, count, its
    number of images, the batch size that cut the input list and the list's fingerprint `inputs`) and
    "shard_paths" (its images' keys in the order it captions them; read by `merge_parts`, not compared).
    inputs and paths None: a part whose inputs are still being listed, "shard" without images and fingerprint and
    no "shard_paths" (`listed_shard` False; merge refuses it)."""
    index, count = shard
    if inputs is None or paths is None:
        return {**options, "shard": {"index": index, "count": count, "batch_size": batch_size}}
    return {
        **options,
        "shard": {"index": index, "count": count, "images": len(paths), "batch_size": batch_size, "inputs": inputs},
        "shard_paths": list(paths),
    }


def listed_shard(options: Mapping[str, Any]) -> bool:
    """Whether run options hold a part's whole input list (its fingerprint), or are no part's."""
    shard = options.get("shard")
    return not isinstance(shard, dict) or "inputs" in shard


def started_shard(options: Mapping[str, Any]) -> dict[str, Any]:
    """A part's run options as recorded before its inputs are listed (`shard_run_options` without inputs)."""
    shard = options.get("shard")
    if not isinstance(shard, dict):
        return dict(options)
    started = {name: value for name, value in options.items() if name != "shard_paths"}
    return {**started, "shard": {name: value for name, value in shard.items() if name not in ("images", "inputs")}}


def unsharded_run_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A part's run options less what the shard added (`shard_run_options`): what one unsharded run records."""
    return {name: value for name, value in options.items() if name not in SHARD_OPTIONS}


def part_shard_problem(
    options: Mapping[str, Any] | None, shard: tuple[int, int], formats: Collection[str]
) -> str | None:
    """Why a part's run options are not those of shard (i, N) (`shard_run_options`) with a record format among
    `formats` (`imgllm.pipeline.records.RECORD_FORMATS`), or None when they are."""
    if options is None:
        return "has no run options"
    recorded = options.get("shard")
    if isinstance(recorded, dict) and "inputs" not in recorded and "shard_paths" not in options:
        return "its run stopped before it had listed its inputs"
    paths = options.get("shard_paths")
    if not isinstance(recorded, dict) or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return "has no shard in its run options"
    if (recorded.get("index"), recorded.get("count")) != tuple(shard) or recorded.get("images") != len(paths):
        return (
            f"records shard {recorded.get('index')}/{recorded.get('count')} of {recorded.get('images')} images, "
            f"not {shard[0]}/{shard[1]}"
        )
    counts = [recorded.get("batch_size"), options.get("top_labels"), options.get("num_captions")]
    if options.get("format") not in formats or not all(type(n) is int and n >= 1 for n in counts):
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


__all__ = [
    "LOCK_SUFFIX",
    "NAME_BYTES",
    "OutputError",
    "OutputInUseError",
    "OutputLock",
    "PART_NAME",
    "RUN_OPTIONS_SUFFIX",
    "SHARD_OPTIONS",
    "START_OVER",
    "changed_run_options",
    "check_distinct_paths",
    "check_run_options",
    "check_writable",
    "find_parts",
    "listed_shard",
    "lock_holder",
    "part_path",
    "part_positions",
    "part_shard_problem",
    "path_identity",
    "prepare_output",
    "read_run_options",
    "refuse_planted_lock_file",
    "refuse_written",
    "shard_run_options",
    "started_shard",
    "unsharded_run_options",
    "write_atomically",
    "write_run_options",
]
