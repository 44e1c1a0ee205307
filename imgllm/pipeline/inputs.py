"""Batch inputs: files, folders, globs and tfds splits → items → batches of uint8 pixels, read ahead in a thread.

    expand_inputs     input specs → `Item`s, in order, one per real image
    glob_once         `glob.glob(pattern, recursive=True)`, sorted, entering each real folder once
    plan_batches      items → (batch index, items) over the full list, minus the batches already done (and, for
                      a shard, minus the other shards' batches)
    shard_items       the items of shard i of N: the batches whose index b has b % N == i, in order
    prefetch_batches  those batches decoded in a background thread (a thread pool per file), `depth` ahead

A batch's index is its position in the full input list, so batch i always holds the same items and draws the same
random key: a resumed run gives the records an uninterrupted one gives, and so does shard i of N (it runs whole
batches of the full list, keeping their index; `shard_item_index` maps its items back to their input position). A
file that cannot be read becomes an error string of its batch (its pixel row stays zero), never an exception.

Nothing read from disk is trusted to be finite or small: folder walks and `**` patterns follow symlinked folders
but enter each real folder once (a link to a parent cannot loop), and images are decoded only up to `max_pixels`
(`DEFAULT_MAX_PIXELS`, checked from the file header) so a small file cannot expand to gigabytes in a worker.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import glob
import hashlib
import os
import queue
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from imgllm.data.images import (
    DEFAULT_MAX_PIXELS,
    array_to_rgb,
    as_size,
    decode_image,
    is_folder_entry,
    list_image_files,
    walk_folders,
)
from imgllm.data.tfds_source import open_split, tfds_builder

TFDS_PREFIX = "tfds:"
SHARD_TEXT = re.compile(r"(\d+)/(\d+)")  # a shard written i/N (`parse_shard`)
# Files that live beside images without being images, skipped without a warning when a folder is expanded: captions
# and references (captions.jsonl, written into the folder it describes by `python -m imgllm.data.demo_images`),
# tables, notes, pages, configs, and an output's own <output>.lock, <output>.run.json and temporary "*.tmp" files.
# Any other file without an image extension is skipped with a warning; a file named explicitly, or matched by a
# glob pattern, is never skipped (one that cannot be decoded gets an error record).
SIDECAR_EXTENSIONS = (
    ".json",
    ".jsonl",
    ".csv",
    ".tsv",
    ".txt",
    ".md",
    ".rst",
    ".html",
    ".htm",
    ".xml",
    ".yaml",
    ".yml",
    ".log",
    ".lock",
    ".tmp",
)


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to caption: `key` is its record's "path"; it is read from a file or a tfds split."""

    key: str
    tfds_source: Any = None
    tfds_index: int = -1

    def load(self, size: int | None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """uint8 [size, size, 3] pixels (native size when None); raises ImageDecodeError naming the input.

        A file that would decode to more than `max_pixels` pixels is refused (see `decode_image`); tfds images
        arrive decoded, so the limit does not apply to them.
        """
        if self.tfds_source is None:
            return decode_image(self.key, size, max_pixels=max_pixels)
        return array_to_rgb(self.tfds_source[self.tfds_index]["image"], as_size(size), resize="stretch")


def tfds_items(spec: str, data_dir: str | None) -> list[Item]:
    """Items of a tfds split, spec "tfds:NAME:SPLIT" (read lazily through tfds.data_source)."""
    body = spec[len(TFDS_PREFIX) :]
    name, _, split = body.partition(":")
    if not name or not split:
        raise ValueError(f"tfds input {spec!r}: write it as tfds:NAME:SPLIT, e.g. tfds:cifar10:test")
    # Prepared on first use (its messages on stderr; without TensorFlow, an error naming the tfds-prepare extra).
    source = open_split(tfds_builder(name, data_dir), split)
    return [
        Item(key=f"{TFDS_PREFIX}{name}:{split}:{index}", tfds_source=source, tfds_index=index)
        for index in range(len(source))
    ]


def glob_once(pattern: str) -> list[str]:
    """The paths `glob.glob(pattern, recursive=True)` gives, sorted, except that `**` enters each real folder once.

    `glob` follows symlinked folders under `**` without remembering them, so two links back to a parent make
    `"L/**/*.png"` grow without bound. Here a folder whose (device, inode) was already entered by the same `**`
    is skipped (see `walk_folders`); on trees without such repeats the result is exactly glob's.
    """
    return sorted(path for path in _iglob(pattern, dironly=False) if path)


def _iglob(pattern: str, dironly: bool) -> Iterator[str]:
    """Paths matching `pattern`, component by component as `glob._iglob` matches them (dironly: folders only)."""
    dirname, basename = os.path.split(pattern)
    if not glob.has_magic(pattern):
        if os.path.lexists(pattern) if basename else os.path.isdir(dirname):
            yield pattern
        return
    parents = _iglob(dirname, dironly=True) if dirname != pattern and glob.has_magic(dirname) else [dirname]
    for parent in parents:
        for name in _names_matching(parent, basename, dironly):
            yield os.path.join(parent, name)


def _names_matching(parent: str, basename: str, dironly: bool) -> Iterator[str]:
    """Names (relative to `parent`) that one pattern component matches: `**`, a wildcard, or a literal name."""
    if basename == "**":
        yield from _recursive_names(parent, dironly)
    elif glob.has_magic(basename):
        names = _list_names(parent, dironly)
        if not basename.startswith("."):  # as in glob: "*" and "?" do not match hidden names
            names = [name for name in names if not name.startswith(".")]
        yield from fnmatch.filter(names, basename)
    elif basename:
        if os.path.lexists(os.path.join(parent, basename)):
            yield basename
    elif os.path.isdir(parent):  # a pattern ending with a separator matches folders only
        yield basename


def _list_names(folder: str, dironly: bool) -> list[str]:
    """Entry names of `folder` (only the folders, following symlinks, when dironly); [] when it cannot be read."""
    try:
        with os.scandir(folder or os.curdir) as entries:
            return [entry.name for entry in entries if not dironly or is_folder_entry(entry)]
    except OSError:
        return []


def _recursive_names(parent: str, dironly: bool) -> Iterator[str]:
    """What `**` matches in `parent`: "" (the folder itself), every non-hidden folder below it and, unless dironly,
    every non-hidden file, relative to `parent`; each real folder is entered once."""
    yield ""
    top = parent or os.curdir
    for folder, files in walk_folders(top):
        relative = os.path.relpath(folder, top)
        if relative != os.curdir:
            yield relative
        if not dironly:
            yield from (
                name if relative == os.curdir else os.path.join(relative, name)
                for name in files
                if not name.startswith(".")
            )


def file_identity(item: Item) -> tuple:
    """What makes two items the same image: (device, inode) of an existing file, so that two paths to one file
    (a symlink, a hard link, "a.png" and "./a.png") count once; the key for tfds items and missing files."""
    if item.tfds_source is None:
        try:
            status = os.stat(item.key)
        except (OSError, ValueError):
            return ("key", item.key)
        return ("file", status.st_dev, status.st_ino)
    return ("key", item.key)


def symlinks_on_path(path: str) -> int:
    """How many components of `path` are symlinks: 0 for a file named through real folders only."""
    prefix, count = (os.sep if os.path.isabs(path) else ""), 0
    for part in path.split(os.sep):
        if part:
            prefix = os.path.join(prefix, part)
            count += os.path.islink(prefix)
    return count


def one_item_per_image(items: Sequence[Item]) -> list[Item]:
    """`items` with repeats of one image (`file_identity`) removed. Each image keeps the place of its first path
    and the name of its path through the fewest symlinks (the first of those), so that a record is named by
    the file's own path wherever a folder link or a loop offered another one."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault(file_identity(item), []).append(item)
    return [
        group[0] if len(group) == 1 else min(group, key=lambda item: symlinks_on_path(item.key))
        for group in groups.values()
    ]


def expand_inputs(inputs: Sequence[str | Item], *, data_dir: str | None = None) -> list[Item]:
    """Files, folders (recursive), glob patterns and tfds splits → items, in the given order, one per real image.

    Files without an image extension inside folders are skipped, with a warning unless they are sidecar files
    (`SIDECAR_EXTENSIONS`: captions.jsonl, notes.txt, an output's .lock, ...). A path or a glob pattern that
    matches nothing stays as an item, so it gets an error record naming it; an existing file is taken literally even
    when its name holds glob characters ("photo[1].png"). `Item`s pass through unchanged. Folders and `**`
    follow symlinked folders, each real folder once (`glob_once`), and several paths to the same file
    (symlinks, hard links) give one item (`one_item_per_image`).
    """
    items: list[Item] = []
    for spec in inputs:
        if isinstance(spec, Item):
            items.append(spec)
        elif spec.startswith(TFDS_PREFIX):
            items.extend(tfds_items(spec, data_dir))
        elif os.path.isdir(spec):
            found = [Item(path) for path in _folder_images(spec)]
            warn_if_empty(spec, found, "a folder")
            items.extend(found)
        elif glob.has_magic(spec) and not os.path.lexists(spec):  # an existing "photo[1].png" is taken literally
            matches = glob_once(spec)
            found = [Item(p) for path in matches for p in (_folder_images(path) if os.path.isdir(path) else [path])]
            if matches:
                warn_if_empty(spec, found, "a pattern")
            items.extend(found if matches else [Item(os.fspath(spec))])  # nothing matched: its error record says so
        else:
            items.append(Item(os.fspath(spec)))
    return one_item_per_image(items)


def warn_if_empty(spec: str, found: list[Item], kind: str) -> None:
    """A warning naming input `spec` (`kind`: "a folder", "a pattern") when it gave no image to caption."""
    if not found:
        warnings.warn(f"input {spec!r} is {kind} with no image files in it: nothing to caption there", stacklevel=3)


def _folder_images(folder: str) -> list[str]:
    """The image files below `folder` (recursive); sidecar files are skipped silently, other files with a warning."""
    return list_image_files(folder, recursive=True, quiet_extensions=SIDECAR_EXTENSIONS)


def plan_batches(
    items: list[Item], done: set[str], batch_size: int, shard: tuple[int, int] | None = None
) -> list[tuple[int, list[Item]]]:
    """Batches over the full input list (so batch i always holds the same items and key), minus finished ones.

    A batch is run when any of its items is missing from the output; only the missing ones are written.
    shard (i, N): only the batches of shard i of N (`shard_batches`), with their index in the full list.
    """
    return [
        (index, chunk)
        for index, chunk in shard_batches(items, batch_size, shard)
        if any(item.key not in done for item in chunk)
    ]


def shard_batches(
    items: Sequence[Item], batch_size: int, shard: tuple[int, int] | None = None
) -> list[tuple[int, list[Item]]]:
    """(batch index, items) of the full input list cut in batches of `batch_size`; with shard (i, N), only the
    batches whose index b has b % N == i (None: every batch)."""
    batches = [
        (start // batch_size, list(items[start : start + batch_size])) for start in range(0, len(items), batch_size)
    ]
    if shard is None:
        return batches
    index, count = shard
    return [(b, chunk) for b, chunk in batches if b % count == index]


def shard_items(items: Sequence[Item], batch_size: int, shard: tuple[int, int] | None) -> list[Item]:
    """The items shard (i, N) captions, in the order it writes them (every item when shard is None)."""
    return [item for _, chunk in shard_batches(items, batch_size, shard) for item in chunk]


def shard_item_index(position: int, shard: tuple[int, int], batch_size: int) -> int:
    """The position in the full input list of the `position`-th item of shard (i, N) (`shard_items`): its batch is
    the shard's (position // batch_size)-th, batch i + N * that of the full list. Only the full list's last batch
    may be short, and it is the last of its shard, so the rule holds for every item."""
    index, count = shard
    return ((position // batch_size) * count + index) * batch_size + position % batch_size


def check_shard(shard: Any) -> tuple[int, int] | None:
    """`shard` as (i, N) with 0 <= i < N, or None; raises ValueError naming a bad one."""
    if shard is None:
        return None
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (index, count) or None, got {shard!r}") from None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (index, count)) or not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with integers 0 <= index < count, got {shard!r}")
    return index, count


def parse_shard(text: str | None, flag: str = "--shard") -> tuple[int, int] | None:
    """A shard written "i/N" (infer.py's --shard=i/N, e.g. from $SLURM_ARRAY_TASK_ID/10) as (i, N) with
    0 <= i < N; None stays None. Raises ValueError naming `flag` and the text."""
    if text is None:
        return None
    match = SHARD_TEXT.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{flag}={text}: write the shard as i/N, 0 <= i < N (e.g. {flag}=0/4 ... {flag}=3/4)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise ValueError(f"{flag}={text}: the count N must be >= 1")
    if index >= count:
        raise ValueError(f"{flag}={text}: the shard index must be below the count (0/{count} to {count - 1}/{count})")
    return index, count


def inputs_fingerprint(items: Sequence[Item]) -> str:
    """A short hash of the input list (its keys, in order): what fixes the batches, and so each shard's images."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.key.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:16]


@dataclasses.dataclass
class Batch:
    """Batch `index` (its position in the full input list, which fixes its random key) and its pixels."""

    index: int
    items: list[Item]
    images: np.ndarray  # uint8 [batch_size, S, S, 3], zero rows for failed and padding slots
    errors: dict[int, str]  # row → "ErrorType: message" for the items that could not be read


def load_batch(
    index: int, items: list[Item], batch_size: int, size: int, pool, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Batch:
    """Decodes a batch's files (in a thread pool); failures become error strings, their rows stay zero.

    A file above `max_pixels` pixels (None: no limit) is such a failure, refused before it is decoded.
    """
    images = np.zeros((batch_size, size, size, 3), np.uint8)
    errors: dict[int, str] = {}

    def load(item):
        try:
            return item.load(size, max_pixels=max_pixels)
        except Exception as error:  # noqa: BLE001 - any failure of one file is that file's error record
            return error

    for row, result in enumerate(pool.map(load, items)):
        if isinstance(result, Exception):
            errors[row] = f"{type(result).__name__}: {result}"
        else:
            images[row] = result
    return Batch(index, items, images, errors)


def prefetch_batches(
    pending: list[tuple[int, list[Item]]],
    batch_size: int,
    size: int,
    *,
    depth: int = 2,
    workers: int = 4,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Batch]:
    """Loads batches in a background thread, at most `depth` ahead: memory stays flat however many images.

    Each of the `workers` decodes at most `max_pixels` pixels at a time (`DEFAULT_MAX_PIXELS`; None: no limit):
    a larger file becomes its batch's error string instead of gigabytes of pixels.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                for index, items in pending:
                    batch = load_batch(index, items, batch_size, size, pool, max_pixels=max_pixels)
                    while not stop.is_set():
                        try:
                            slots.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, re-raised there
            slots.put(error)
            return
        slots.put(done)

    thread = threading.Thread(target=produce, name="infer-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            batch = slots.get()
            if batch is done:
                return
            if isinstance(batch, BaseException):
                raise batch
            yield batch
    finally:
        stop.set()
        thread.join(timeout=5)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SIDECAR_EXTENSIONS",
    "TFDS_PREFIX",
    "Batch",
    "Item",
    "check_shard",
    "expand_inputs",
    "file_identity",
    "glob_once",
    "inputs_fingerprint",
    "load_batch",
    "one_item_per_image",
    "parse_shard",
    "plan_batches",
    "prefetch_batches",
    "shard_batches",
    "shard_item_index",
    "shard_items",
    "symlinks_on_path",
    "tfds_items",
]
