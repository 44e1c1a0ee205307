"""Batch inputs: files, folders, globs and tfds splits → items → batches of uint8 pixels, read ahead in a thread.

    InputStream       input specs → (position, `Item`), in order, one per real image, listed as they are asked
                      for (a folder one directory at a time); a shard's stream keeps only its own batches' items
    expand_inputs     the same items as a list (`iter_inputs`: as an iterator)
    glob_once         `glob.glob(pattern, recursive=True)`, sorted, entering each real folder once
    stream_batches    (position, item) pairs → (batch index, items), batch b holding positions b*B..(b+1)*B-1
    shard_items       the items of shard i of N: the batches whose index b has b % N == i, in order (the list form
                      of what a shard's stream keeps: the tests' oracle)
    prefetch_batches  those batches decoded in a background thread (a thread pool per file), `depth` ahead

A batch's index is its position in the full input list, so batch i always holds the same items and draws the same
random key: a resumed run gives the records an uninterrupted one gives, and so does shard i of N (it runs whole
batches of the full list, keeping their index; `shard_item_index` maps its items back to their input position). A
file that cannot be read becomes an error string of its batch (its pixel row stays zero), never an exception.

Inputs stream: a folder is walked depth-first, each directory's entries sorted as it is read, in the order of the
sorted paths (the order does not depend on the filesystem's), so the first batch is captioned once its images are
listed, not after a listing of a million files. What a stream holds is one directory's names per level of the walk,
the identity of every image listed so far (to drop a second path to one file: an int per file, about 70 bytes with
its set slot, or the key of a tfds image or a missing file) and the kept items not yet handed out; a shard's
stream drops the other shards' items as they pass. A glob pattern's matches are listed (as paths) before its
first item, as `glob_once` sorts them.

Nothing read from disk is trusted to be finite or small: folder walks and `**` patterns follow symlinked folders
but enter each real folder once (a link to a parent cannot loop), and images are decoded only up to `max_pixels`
(`DEFAULT_MAX_PIXELS`, checked from the file header) so a small file cannot expand to gigabytes in a worker.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import fnmatch
import glob
import hashlib
import itertools
import math
import os
import queue
import re
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from imgllm.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    array_to_rgb,
    as_size,
    decode_image,
    directory_identity,
    has_image_extension,
    is_folder_entry,
    walk_folders,
)
from imgllm.data.tfds_source import open_split, tfds_builder

TFDS_PREFIX = "tfds:"
SHARD_TEXT = re.compile(r"(\d+)/(\d+)")  # a shard written i/N (`parse_shard`)
FINGERPRINT_DIGITS = 16  # hex digits of an input list's fingerprint (`inputs_fingerprint`)
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


def iter_tfds_items(spec: str, data_dir: str | None) -> Iterator[Item]:
    """The items of a tfds split, spec "tfds:NAME:SPLIT" (read lazily through tfds.data_source), one at a time; the
    split is opened (and prepared on first use) when the first is asked for."""
    body = spec[len(TFDS_PREFIX) :]
    name, _, split = body.partition(":")
    if not name or not split:
        raise ValueError(f"tfds input {spec!r}: write it as tfds:NAME:SPLIT, e.g. tfds:cifar10:test")
    # Prepared on first use (its messages on stderr; without TensorFlow, an error naming the tfds-prepare extra).
    source = open_split(tfds_builder(name, data_dir), split)
    for index in range(len(source)):
        yield Item(key=f"{TFDS_PREFIX}{name}:{split}:{index}", tfds_source=source, tfds_index=index)


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


def symlinks_on_path(path: str) -> int:
    """How many components of `path` are symlinks: 0 for a file named through real folders only."""
    prefix, count = (os.sep if os.path.isabs(path) else ""), 0
    for part in path.split(os.sep):
        if part:
            prefix = os.path.join(prefix, part)
            count += os.path.islink(prefix)
    return count


def expand_inputs(inputs: Sequence[str | Item], *, data_dir: str | None = None) -> list[Item]:
    """Files, folders (recursive), glob patterns and tfds splits → items, in the given order, one per real image.

    Files without an image extension inside folders are skipped, with a warning unless they are sidecar files
    (`SIDECAR_EXTENSIONS`: captions.jsonl, notes.txt, an output's .lock, ...). A path or a glob pattern that
    matches nothing stays as an item, so it gets an error record naming it; an existing file is taken literally even
    when its name holds glob characters ("photo[1].png"). `Item`s pass through unchanged. Folders and `**`
    follow symlinked folders, each real folder once (`glob_once`, `iter_folder_images`), and several paths to the
    same file (symlinks, hard links) give one item (see `InputStream`). The list of `iter_inputs`.
    """
    return list(iter_inputs(inputs, data_dir=data_dir))


def iter_inputs(inputs: Sequence[str | Item], *, data_dir: str | None = None) -> Iterator[Item]:
    """`expand_inputs`'s items, listed as they are asked for (`InputStream`)."""
    return (item for _, item in InputStream(inputs, data_dir=data_dir))


@dataclasses.dataclass(frozen=True)
class Listing:
    """A whole input list, once an `InputStream` has read it to its end: how many items, their fingerprint
    (`inputs_fingerprint` of the keys as first listed) and, when the stream was asked to keep them, the keys of the
    items it kept (a shard's), in order."""

    count: int
    fingerprint: str
    keys: list[str] | None


@dataclasses.dataclass(slots=True)
class _Kept:
    """An item a stream keeps and has not handed out yet; `links` (symlinks on its path) while a later path with
    fewer could still name it (`final` False)."""

    position: int
    item: Item
    links: int = 0
    final: bool = True


class InputStream:
    """The items of input specs in `expand_inputs`'s order, one per real image, listed as they are asked for.

    Iterating gives (position in the full list, item) for the items `keep(position)` keeps (None: all), so that a
    shard drops the other shards' items as they pass. matches: a pattern's matches (`glob_once`) already found, used
    instead of matching it again (each once). skip(item): an item not listed at all, given no position (a
    run's own files met in a folder it captions). check(item) sees every item once, before it is kept or
    dropped, and a path that renames a kept one (a run refuses there an input that is a file it writes). collect:
    also the kept items' keys, in order, in `listing.keys`. `count` is the number of items listed so far, `kept`
    how many of them were kept, `listing` the whole list's `Listing` once the stream has read it to its end (None
    before).

    One image reached by two paths is listed once, at the place of its first path, named by the path through the
    fewest symlinks (the first of those), so that a record is named by the file's own path wherever a folder link or
    a loop offered another one. A kept item whose path crosses more symlinks than a later input's path
    could (the spec's own prefix, and each later spec's) is held, with the items after it, until no later path can
    name it better: at the end of its spec, or of the listing. Without symlinks below the inputs nothing waits.
    """

    def __init__(
        self,
        inputs: Iterable[str | os.PathLike | Item],
        *,
        data_dir: str | None = None,
        keep: Callable[[int], bool] | None = None,
        check: Callable[[Item], None] | None = None,
        skip: Callable[[Item], bool] | None = None,
        matches: dict[str, list[str]] | None = None,
        collect: bool = False,
    ):
        self.specs = [spec if isinstance(spec, Item) else os.fspath(spec) for spec in inputs]
        self._matches = dict(matches or {})
        self._listed = self._list(data_dir)
        self._keep, self._check, self._skip = keep, check, skip
        self._keys: list[str] | None = [] if collect else None
        self._seen: set = set()  # identities of the items listed (`_identity`)
        self._queue: collections.deque[_Kept] = collections.deque()
        self._provisional: dict[Any, _Kept] = {}  # kept items a later path may still rename
        self._floors: list[float] | None = None  # fewest symlinks on any path of spec j or later (`_floor`)
        self._folder_links: dict[str, int] = {}
        self._digest = hashlib.sha256()
        self.count = 0
        self.kept = 0
        self.listing: Listing | None = None

    def __iter__(self) -> InputStream:
        return self

    def __next__(self) -> tuple[int, Item]:
        while self.listing is None and not (self._queue and self._queue[0].final):
            self._advance()
        if not self._queue:
            raise StopIteration
        kept = self._queue.popleft()
        if self._keys is not None and self.listing is None:  # at the end the queued keys were collected at once
            self._keys.append(kept.item.key)
        return kept.position, kept.item

    def read_to(self, count: float = math.inf) -> list[Item]:
        """Lists on until `count` items are listed (inf: to the end); the kept items not handed out yet."""
        while self.listing is None and self.count < count:
            self._advance()
        return [kept.item for kept in self._queue]

    def first_kept(self, count: int) -> list[Item]:
        """Lists on until `count` items are kept and named for good (or the list ends); the first `count` kept items
        not handed out yet (call it before iterating)."""
        while self.listing is None and (len(self._queue) < count or self._renameable(count)):
            self._advance()
        return [kept.item for kept in itertools.islice(self._queue, count)]

    def _renameable(self, count: int) -> bool:
        """Whether a later path may still rename one of the first `count` kept items (see the class docstring)."""
        return bool(self._provisional) and any(not kept.final for kept in itertools.islice(self._queue, count))

    def _list(self, data_dir: str | None) -> Iterator[tuple[int, Item | None]]:
        """(spec number, item) for every item of every spec, repeats included; (spec number, None) after each."""
        for number, spec in enumerate(self.specs):
            matched = self._matches.pop(spec, None) if isinstance(spec, str) else None  # held until used, once
            for item in spec_items(spec, data_dir, matched):
                yield number, item
            yield number, None

    def _advance(self) -> None:
        """Lists one more item (or the end of a spec, or of the list) and keeps it, drops it or renames by it."""
        number, item = next(self._listed, (len(self.specs), None))
        if number == len(self.specs):
            self._end()
        elif item is None:  # later paths come from later specs only
            self._settle(self._floor(number + 1))
        elif self._skip is None or not self._skip(item):
            identity, linked = _identity(item)
            if identity in self._seen:
                self._rename(identity, item, number)
            else:
                self._seen.add(identity)
                self._add(item, identity, number, linked)

    def _add(self, item: Item, identity: Any, number: int, linked: bool) -> None:
        position, self.count = self.count, self.count + 1
        add_to_fingerprint(self._digest, item.key)
        if self._check is not None:
            self._check(item)
        if self._keep is not None and not self._keep(position):
            return
        kept, self.kept = _Kept(position, item), self.kept + 1
        if isinstance(identity, int):  # a file: a later path through fewer symlinks would name it
            links = self._links(item.key, linked)
            if links and links > self._floor(number):
                kept.links, kept.final = links, False
                self._provisional[identity] = kept
        self._queue.append(kept)

    def _rename(self, identity: Any, item: Item, number: int) -> None:
        """A second path to a kept item not final yet names it when it crosses fewer symlinks."""
        kept = self._provisional.get(identity)
        if kept is None:
            return
        links = symlinks_on_path(item.key)
        if links < kept.links:
            if self._check is not None:
                self._check(item)
            kept.item, kept.links = item, links
        if kept.links <= self._floor(number):
            kept.final = True
            del self._provisional[identity]

    def _settle(self, floor: float) -> None:
        """Items no path of the specs left can name with fewer symlinks than `floor` are final."""
        for identity, kept in list(self._provisional.items()):
            if kept.links <= floor:
                kept.final = True
                del self._provisional[identity]

    def _end(self) -> None:
        self._settle(math.inf)
        if self._keys is not None:
            self._keys.extend(kept.item.key for kept in self._queue)
        self.listing = Listing(self.count, self._digest.hexdigest()[:FINGERPRINT_DIGITS], self._keys)

    def _floor(self, number: int) -> float:
        """The fewest symlinks any path of spec `number` or a later one can cross: those on the specs' own paths
        (a folder's, a pattern's part before its first wildcard). Computed once, when first asked."""
        if self._floors is None:
            self._floors = [math.inf] * (len(self.specs) + 1)
            for index in reversed(range(len(self.specs))):
                self._floors[index] = min(_spec_links(self.specs[index]), self._floors[index + 1])
        return self._floors[number]

    def _links(self, path: str, linked: bool) -> int:
        """`symlinks_on_path(path)` of a file whose last name is a symlink or not (`linked`), its folder's count
        cached (items come folder by folder)."""
        folder, name = os.path.split(path)
        if not name:
            return symlinks_on_path(path)
        if folder not in self._folder_links:
            if len(self._folder_links) >= 4096:
                self._folder_links.clear()
            self._folder_links[folder] = symlinks_on_path(folder)
        return self._folder_links[folder] + linked


def _identity(item: Item) -> tuple[Any, bool]:
    """What makes two items the same image, (device << 64 | inode) of an existing file (two paths to one file, a
    symlink, a hard link, "a.png" and "./a.png", count once), else the key; and whether the item's path ends in a
    symlink (one lstat for a file that is not a link)."""
    if item.tfds_source is not None:
        return item.key, False
    try:
        status = os.lstat(item.key)
        linked = stat.S_ISLNK(status.st_mode)
        if linked:
            status = os.stat(item.key)
    except (OSError, ValueError):
        return item.key, False
    return status.st_dev << 64 | status.st_ino, linked


def _spec_links(spec: str | Item) -> float:
    """The symlinks every file path a spec gives crosses at least (inf for a tfds split)."""
    if isinstance(spec, Item):
        return symlinks_on_path(spec.key) if spec.tfds_source is None else math.inf
    if spec.startswith(TFDS_PREFIX):
        return math.inf
    prefix = spec
    if is_pattern(spec):
        while glob.has_magic(prefix):
            prefix = os.path.dirname(prefix)
    return symlinks_on_path(prefix)


def is_pattern(spec: str) -> bool:
    """Whether an input spec (not a tfds split) is a glob pattern; an existing "photo[1].png" is taken literally."""
    return glob.has_magic(spec) and not os.path.lexists(spec)


def spec_items(spec: str | Item, data_dir: str | None = None, matches: list[str] | None = None) -> Iterator[Item]:
    """The items of one input spec, in order, repeats of one image included (`expand_inputs` says what each kind
    of spec gives); a folder's and a pattern's are listed as they are asked for. matches: a pattern's
    `glob_once`, when already found."""
    if isinstance(spec, Item):
        yield spec
    elif spec.startswith(TFDS_PREFIX):
        yield from iter_tfds_items(spec, data_dir)
    elif os.path.isdir(spec):
        yield from warned_if_empty(spec, "a folder", map(Item, iter_folder_images(spec)))
    elif is_pattern(spec):
        matches = glob_once(spec) if matches is None else matches
        if not matches:  # nothing matched: its error record says so
            yield Item(spec)
            return
        paths = (p for path in matches for p in (iter_folder_images(path) if os.path.isdir(path) else [path]))
        yield from warned_if_empty(spec, "a pattern", map(Item, paths))
    else:
        yield Item(spec)


def warned_if_empty(spec: str, kind: str, items: Iterable[Item]) -> Iterator[Item]:
    """`items`, then a warning naming input `spec` (`kind`: "a folder", "a pattern") when there was none."""
    empty = True
    for item in items:
        empty = False
        yield item
    if empty:
        warnings.warn(f"input {spec!r} is {kind} with no image files in it: nothing to caption there", stacklevel=2)


def iter_folder_images(top: str) -> Iterator[str]:
    """The image files below folder `top`, as `list_image_files(top, recursive=True)` lists them (sorted paths),
    read one directory at a time: depth-first, each directory's entries sorted as read (a folder's name with a
    separator after it, so that the paths come out sorted). Hidden names are skipped; sidecar files
    (`SIDECAR_EXTENSIONS`) silently, other files without an image extension with a warning.

    Symlinked folders are followed where they stand, each real folder once, except a link to a folder below `top`
    (not hidden), which is listed under its own path. (`walk_folders` follows links after every other folder; the
    two differ only where two links lead to one folder outside `top`: here the first in path order names it.)
    """
    real_top, seen = os.path.realpath(top), set()
    identity = directory_identity(top)
    if identity is None:
        return
    seen.add(identity)
    levels = [_sorted_entries(top)]
    while levels:
        entry = next(levels[-1], None)
        if entry is None:
            levels.pop()
        elif is_folder_entry(entry):
            identity = None if entry.name.startswith(".") else directory_identity(entry.path)
            if identity is None or identity in seen or (entry.is_symlink() and _below(entry.path, real_top)):
                continue
            seen.add(identity)
            levels.append(_sorted_entries(entry.path))
        elif entry.name.startswith("."):
            continue
        elif has_image_extension(entry.name):
            yield entry.path
        elif not entry.name.lower().endswith(SIDECAR_EXTENSIONS):
            warnings.warn(f"skipping {entry.path!r}: not an image file ({', '.join(IMAGE_EXTENSIONS)})", stacklevel=2)


def _sorted_entries(folder: str) -> Iterator[os.DirEntry]:
    """The entries of `folder` in the order their paths sort (a folder as its name and a separator); none when it
    cannot be read."""
    try:
        with os.scandir(folder) as iterator:
            entries = list(iterator)
    except OSError as error:
        warnings.warn(f"{folder} cannot be read ({error.strerror or error}): its images are skipped", stacklevel=2)
        return iter(())
    return iter(sorted(entries, key=lambda entry: entry.name + os.sep if is_folder_entry(entry) else entry.name))


def _below(path: str, real_top: str) -> bool:
    """Whether the folder `path` leads to is `real_top` or below it, through no hidden name: a folder the walk of
    `real_top` lists under its own path."""
    target = os.path.realpath(path)
    if os.path.commonpath([target, real_top]) != real_top:
        return False
    relative = os.path.relpath(target, real_top)
    return relative == os.curdir or not any(part.startswith(".") for part in relative.split(os.sep))


def in_shard(position: int, shard: tuple[int, int] | None, batch_size: int) -> bool:
    """Whether the item at `position` of the full input list is shard (i, N)'s: its batch b has b % N == i."""
    return shard is None or (position // batch_size) % shard[1] == shard[0]


def stream_batches(items: Iterable[tuple[int, Item]], batch_size: int) -> Iterator[tuple[int, list[Item]]]:
    """(batch index, items) from (position, item) pairs in position order: batch b holds the positions
    b*batch_size .. (b+1)*batch_size - 1 that `items` holds (a shard's stream holds only its own batches')."""
    for index, group in itertools.groupby(items, key=lambda pair: pair[0] // batch_size):
        yield index, [item for _, item in group]


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
        add_to_fingerprint(digest, item.key)
    return digest.hexdigest()[:FINGERPRINT_DIGITS]


def add_to_fingerprint(digest: Any, key: str) -> None:
    """Adds one input's key to a sha256 `digest` of an input list (`inputs_fingerprint`, `InputStream.listing`)."""
    digest.update(key.encode("utf-8", "surrogateescape") + b"\0")


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
    pending: Iterable[tuple[int, list[Item]]],
    batch_size: int,
    size: int,
    *,
    depth: int = 2,
    workers: int = 4,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[Batch]:
    """Loads batches in a background thread, at most `depth` ahead: memory stays flat however many images.
    `pending` is iterated in that thread, so a stream of batches (`stream_batches`) goes on listing there.

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
    "InputStream",
    "Listing",
    "expand_inputs",
    "glob_once",
    "in_shard",
    "inputs_fingerprint",
    "iter_folder_images",
    "iter_inputs",
    "iter_tfds_items",
    "load_batch",
    "parse_shard",
    "prefetch_batches",
    "shard_batches",
    "shard_item_index",
    "shard_items",
    "is_pattern",
    "spec_items",
    "stream_batches",
    "symlinks_on_path",
    "warned_if_empty",
]
