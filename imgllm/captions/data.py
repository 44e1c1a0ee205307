"""Image–caption data for the captioner, as `imgllm.data.ImageDataset`s whose `captions` are set.

Sources (`load_caption_dataset(spec, split, ...)`):
  "demo"               the procedurally generated shapes, one exact caption per image (offline);
  "captions:<root>"    an image folder with JSON-lines caption files <root>/<split>.jsonl, one object per line
                       {"path": "<image file, relative to root or absolute>", "caption": "...", "label"?: "..."};
                       an image may have several lines (several references). The class of an image is its
                       "label" field, or else the name of the folder that holds it. Without <root>/validation.jsonl,
                       validation is carved from train.jsonl (class-balanced, deterministic);
  "tfds:coco_captions" COCO 2014 with the Karpathy splits through `tfds.data_source` (needs the prepared dataset;
                       preparing it needs TensorFlow). The label of an image is the category of its largest object.
  any other `imgllm.data.load_dataset` spec (e.g. "cifar10"): images and labels only (captions None); the
                       captioner then trains on class-template captions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from imgllm.data.dataset import ImageDataset, balanced_prefix_indices, carve_validation_indices
from imgllm.data.images import array_to_rgb, decode_image_files
from imgllm.data.load import load_dataset
from imgllm.data.text import iter_json_lines

CAPTIONS_PREFIX = "captions:"
COCO_SPEC = "tfds:coco_captions"
_COCO_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class CaptionFileError(ValueError):
    """A captions file is missing or has a malformed line (the message names file and line)."""


def read_captions_file(path: str) -> list[dict[str, str]]:
    """The records of a JSON-lines captions file: [{"path", "caption", "label"?}], paths made absolute."""
    if not os.path.isfile(path):
        raise CaptionFileError(f"captions file {path} does not exist")
    root = os.path.dirname(os.path.abspath(path))
    records = []
    try:
        for where, record in iter_json_lines(path):
            records.append(_caption_record(record, where, root))
    except CaptionFileError:
        raise
    except ValueError as error:  # invalid JSON, named by file and line
        raise CaptionFileError(str(error)) from None
    if not records:
        raise CaptionFileError(f"captions file {path} has no records")
    return records


def _caption_record(record: Any, where: str, root: str) -> dict[str, str]:
    """One checked captions-file record, its image path made absolute against the file's folder."""
    if not isinstance(record, dict):
        raise CaptionFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("path", "caption"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise CaptionFileError(f"{where}: needs a non-empty string {key!r}, got {record.get(key)!r}")
    if "label" in record and not isinstance(record["label"], str):
        raise CaptionFileError(f"{where}: 'label' must be a string, got {record['label']!r}")
    image_path = record["path"] if os.path.isabs(record["path"]) else os.path.join(root, record["path"])
    return {
        "path": os.path.normpath(image_path),
        "caption": record["caption"].strip(),
        **({"label": record["label"]} if "label" in record else {}),
    }


def group_captions(records: Iterable[Mapping[str, str]]) -> tuple[list[str], list[tuple[str, ...]], list[str]]:
    """(image paths in first-seen order, their captions, their class names) from caption records.

    Several records for one path add references; their labels must agree (error naming the path otherwise).
    """
    captions: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    for record in records:
        path = record["path"]
        label = record.get("label") or os.path.basename(os.path.dirname(path))
        if labels.setdefault(path, label) != label:
            raise CaptionFileError(f"{path}: captions give two labels, {labels[path]!r} and {label!r}")
        captions.setdefault(path, []).append(record["caption"])
    paths = list(captions)
    return paths, [tuple(captions[p]) for p in paths], [labels[p] for p in paths]


def load_caption_folder(
    root: str, split: str, *, image_size: int | None = None, class_names: Sequence[str] | None = None
) -> ImageDataset:
    """The `split` of a captions folder (see the module docstring) with every image decoded once."""
    split_file = os.path.join(root, f"{split}.jsonl")
    carve = split in ("train", "validation") and not os.path.isfile(os.path.join(root, "validation.jsonl"))
    source_file = os.path.join(root, "train.jsonl") if carve else split_file
    paths, captions, names = group_captions(read_captions_file(source_file))
    train_names = class_names or sorted(
        set(group_captions(read_captions_file(os.path.join(root, "train.jsonl")))[2])
        if split != "train"
        else set(names)
    )
    unknown = sorted(set(names) - set(train_names))
    if unknown:
        raise CaptionFileError(f"{source_file}: classes {unknown} are not among the training classes {train_names}")
    labels = np.array([list(train_names).index(n) for n in names], np.int32)
    if carve:
        train_rows, validation_rows = carve_validation_indices(labels)
        rows = train_rows if split == "train" else validation_rows
        paths, captions, labels = [paths[i] for i in rows], [captions[i] for i in rows], labels[rows]
    images, kept = decode_image_files(paths, image_size)
    if not kept.all():
        raise CaptionFileError(f"{source_file}: could not decode {[p for p, k in zip(paths, kept) if not k][:5]}")
    return ImageDataset(
        images=images, labels=labels, class_names=tuple(train_names), captions=tuple(captions), paths=tuple(paths)
    )


def coco_example_to_record(example: Mapping[str, Any]) -> tuple[np.ndarray, tuple[str, ...], int]:
    """(image uint8 [H, W, 3], its captions, the label of its largest object or -1) from one coco_captions example."""
    image = np.asarray(example["image"], np.uint8)
    texts = example["captions"]["text"]
    captions = tuple(t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in np.asarray(texts).reshape(-1))
    objects = example.get("objects") or {}
    labels = np.asarray(objects.get("label", np.zeros(0)), np.int64).reshape(-1)
    boxes = np.asarray(objects.get("bbox", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    if len(labels) == 0:
        return image, captions, -1
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return image, captions, int(labels[int(np.argmax(areas))])


def load_coco_captions(
    split: str, *, data_dir: str | None = None, image_size: int = 32, num_examples: int | None = None
) -> ImageDataset:
    """COCO captions (Karpathy splits) from `tfds.data_source("coco_captions")`, images resized to image_size.

    Images without any object are dropped (they have no class for the LM-classification metric).
    """
    import tensorflow_datasets as tfds

    if split not in _COCO_SPLITS:
        raise ValueError(f"coco_captions split {split!r}: expected one of {tuple(_COCO_SPLITS)}")
    source = tfds.data_source("coco_captions", split=_COCO_SPLITS[split], data_dir=data_dir)
    class_names = tuple(tfds.builder("coco_captions", data_dir=data_dir).info.features["objects"]["label"].names)
    count = len(source) if num_examples is None else min(num_examples, len(source))
    images, captions, labels = [], [], []
    for index in range(count):
        image, texts, label = coco_example_to_record(source[index])
        if label < 0 or not texts:
            continue
        images.append(array_to_rgb(image, (image_size, image_size)))
        captions.append(texts)
        labels.append(label)
    if not images:
        raise ValueError(f"coco_captions {split}: no example with objects and captions among the first {count}")
    return ImageDataset(
        images=np.stack(images), labels=np.array(labels, np.int32), class_names=class_names, captions=tuple(captions)
    )


def load_caption_dataset(
    spec: str,
    split: str,
    *,
    seed: int = 0,
    data_dir: str | None = None,
    image_size: int | None = None,
    num_examples: int | None = None,
) -> ImageDataset:
    """An ImageDataset for `spec` (see the module docstring); captions are None for sources without any."""
    if spec.startswith(CAPTIONS_PREFIX):
        dataset = load_caption_folder(spec[len(CAPTIONS_PREFIX) :], split, image_size=image_size)
    elif spec == COCO_SPEC:
        return load_coco_captions(split, data_dir=data_dir, image_size=image_size or 32, num_examples=num_examples)
    else:
        return load_dataset(spec, split, seed=seed, data_dir=data_dir, image_size=image_size, num_examples=num_examples)
    if num_examples is not None:
        dataset = dataset.subset(balanced_prefix_indices(dataset.labels, num_examples))
    return dataset
