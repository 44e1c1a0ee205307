"""Batch inputs: files, folders, globs and tfds splits → items → batches of uint8 pixels, read ahead in a thread.

    expand_inputs     input specs → `Item`s, in order, without repeats
    plan_batches      items → (batch index, items) over the full list, minus the batches already done
    prefetch_batches  those batches decoded in a background thread (a thread pool per file), `depth` ahead

A batch's index is its position in the full input list, so batch i always holds the same items and draws the same
random key: a resumed run gives the records an uninterrupted one gives. A file that cannot be read becomes an
error string of its batch (its pixel row stays zero), never an exception.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from imgllm.data.images import array_to_rgb, as_size, decode_image, list_image_files

TFDS_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to caption: `key` is its record's "path"; it is read from a file or a tfds split."""

    key: str
    tfds_source: Any = None
    tfds_index: int = -1

    def load(self, size: int | None) -> np.ndarray:
        """uint8 [size, size, 3] pixels (native size when None); raises ImageDecodeError naming the input."""
        if self.tfds_source is None:
            return decode_image(self.key, size)
        return array_to_rgb(self.tfds_source[self.tfds_index]["image"], as_size(size), resize="stretch")


def tfds_items(spec: str, data_dir: str | None) -> list[Item]:
    """Items of a tfds split, spec "tfds:NAME:SPLIT" (read lazily through tfds.data_source)."""
    body = spec[len(TFDS_PREFIX):]
    name, _, split = body.partition(":")
    if not name or not split:
        raise ValueError(f"tfds input {spec!r}: write it as tfds:NAME:SPLIT, e.g. tfds:cifar10:test")
    import tensorflow_datasets as tfds  # optional heavy dependency: only for tfds inputs

    source = tfds.data_source(name, split=split, data_dir=data_dir)
    return [Item(key=f"{TFDS_PREFIX}{name}:{split}:{index}", tfds_source=source, tfds_index=index)
            for index in range(len(source))]


def expand_inputs(inputs: Sequence[str | Item], *, data_dir: str | None = None) -> list[Item]:
    """Files, folders (recursive), glob patterns and tfds splits → items, in the given order, without repeats.

    Files without an image extension inside folders are skipped with a warning. A path that matches nothing
    stays as an item, so it gets an error record naming it. `Item`s pass through unchanged.
    """
    items: list[Item] = []
    for spec in inputs:
        if isinstance(spec, Item):
            items.append(spec)
        elif spec.startswith(TFDS_PREFIX):
            items.extend(tfds_items(spec, data_dir))
        elif os.path.isdir(spec):
            items.extend(Item(path) for path in list_image_files(spec, recursive=True))
        elif glob.has_magic(spec):
            for path in sorted(glob.glob(spec, recursive=True)):
                items.extend(Item(p) for p in (list_image_files(path, recursive=True) if os.path.isdir(path)
                                               else [path]))
        else:
            items.append(Item(os.fspath(spec)))
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.key not in seen:
            seen.add(item.key)
            unique.append(item)
    return unique


def plan_batches(items: list[Item], done: set[str], batch_size: int) -> list[tuple[int, list[Item]]]:
    """Batches over the full input list (so batch i always holds the same items and key), minus finished ones.

    A batch is run when any of its items is missing from the output; only the missing ones are written.
    """
    batches = [(start // batch_size, items[start:start + batch_size]) for start in range(0, len(items), batch_size)]
    return [(index, chunk) for index, chunk in batches if any(item.key not in done for item in chunk)]


@dataclasses.dataclass
class Batch:
    """Batch `index` (its position in the full input list, which fixes its random key) and its pixels."""

    index: int
    items: list[Item]
    images: np.ndarray       # uint8 [batch_size, S, S, 3], zero rows for failed and padding slots
    errors: dict[int, str]   # row → "ErrorType: message" for the items that could not be read


def load_batch(index: int, items: list[Item], batch_size: int, size: int, pool) -> Batch:
    """Decodes a batch's files (in a thread pool); failures become error strings, their rows stay zero."""
    images = np.zeros((batch_size, size, size, 3), np.uint8)
    errors: dict[int, str] = {}

    def load(item):
        try:
            return item.load(size)
        except Exception as error:  # noqa: BLE001 - any failure of one file is that file's error record
            return error

    for row, result in enumerate(pool.map(load, items)):
        if isinstance(result, Exception):
            errors[row] = f"{type(result).__name__}: {result}"
        else:
            images[row] = result
    return Batch(index, items, images, errors)


def prefetch_batches(pending: list[tuple[int, list[Item]]], batch_size: int, size: int, *, depth: int = 2,
                     workers: int = 4) -> Iterator[Batch]:
    """Loads batches in a background thread, at most `depth` ahead: memory stays flat however many images."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                for index, items in pending:
                    batch = load_batch(index, items, batch_size, size, pool)
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


__all__ = ["Batch", "Item", "TFDS_PREFIX", "expand_inputs", "load_batch", "plan_batches", "prefetch_batches",
           "tfds_items"]
