"""TensorFlow Datasets (CIFAR-10 and others) read through `tfds` data sources, without TensorFlow.

Reading a prepared dataset needs no TensorFlow: the split is opened as an ArrayRecord data source
(random access, numpy examples). *Preparing* a dataset the first time (download, then encode images
as PNG) does need TensorFlow, which is an optional extra of this project; without it the loader
raises `TfdsPrepareError` naming the install command. The download is kept under `data_dir`, so a
second try after installing the extra does not download again.

Split names: ``train``, ``validation``, ``test``, ``train_full``. A dataset without a validation
split (CIFAR-10) gets one carved from train, class-balanced and deterministic
(`carve_validation_indices`); ``train`` then excludes it and ``train_full`` is the whole train split.
Any other split string (``"test[:10%]"``) goes to tfds unchanged.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from imgllm.data.dataset import (
    DEFAULT_VALIDATION_FRACTION,
    ImageDataset,
    balanced_prefix_indices,
    carve_validation_indices,
)
from imgllm.data.images import array_to_rgb, as_size

TFDS_PREPARE_INSTALL = 'pip install -e ".[tfds-prepare]"'
# Modules that preparing a tfds dataset imports but reading it does not. importlib_resources is an
# undeclared dependency of tensorflow-datasets 4.9.x on Python >= 3.9 (tensorflow/datasets#11212).
_PREPARE_ONLY_MODULES = ("tensorflow", "importlib_resources")


class TfdsPrepareError(ImportError):
    """Preparing a tfds dataset needs a module that is not installed."""


def tfds_builder(name: str, data_dir: str | None = None):
    """The tfds builder of `name`, set to store (or read) ArrayRecord files, which data sources need."""
    import tensorflow_datasets as tfds  # imported here: slow, and unneeded by the other sources

    return tfds.builder(name, data_dir=data_dir, file_format="array_record")


def open_split(builder, split: str):
    """Prepares `builder` if it is not on disk yet, then opens `split` as a random-access data source.

    What preparing prints (tfds's download messages) goes to stderr: stdout is where infer.py writes records."""
    if not builder.is_prepared():
        try:
            with contextlib.redirect_stdout(sys.stderr):
                builder.download_and_prepare()
        except ModuleNotFoundError as error:
            if error.name not in _PREPARE_ONLY_MODULES:
                raise
            raise TfdsPrepareError(
                f"preparing the tfds dataset {builder.name!r} in {str(builder.data_dir)!r} needs the module "
                f"{error.name!r}, which is not installed. Reading a prepared dataset does not need it. "
                f"Install it with: {TFDS_PREPARE_INSTALL}   (then run again; downloads are kept)"
            ) from error
    return builder.as_data_source(split=split)


def _read_examples(source, image_key: str, label_key: str, size, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """All examples of a data source as (uint8 images [N, H, W, 3], int32 labels [N])."""
    images, labels = [], []
    for index in range(len(source)):
        example = source[index]
        missing = [k for k in (image_key, label_key) if k not in example]
        if missing:
            raise KeyError(f"tfds example has no feature {missing[0]!r}; features: {sorted(example)}")
        image = array_to_rgb(example[image_key], size, resize)
        size = size or image.shape[:2]  # the first image fixes the size when none was asked for
        images.append(image)
        labels.append(int(example[label_key]))
    if not images:
        return np.zeros((0, *(size or (0, 0)), 3), np.uint8), np.zeros(0, np.int32)
    return np.stack(images), np.array(labels, dtype=np.int32)


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    num_examples: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    resize: str = "crop",
    image_key: str = "image",
    label_key: str = "label",
) -> ImageDataset:
    """Reads `split` of tfds dataset `name` into memory (see the module docstring for split names).

    `num_examples` keeps a class-interleaved subset (`balanced_prefix_indices`) of the split.
    """
    builder = tfds_builder(name, data_dir)
    has_validation = "validation" in builder.info.splits
    carve = split in ("train", "validation") and not has_validation
    tfds_split = "train" if carve or split == "train_full" else split
    source = open_split(builder, tfds_split)
    images, labels = _read_examples(source, image_key, label_key, as_size(image_size), resize)
    if carve:
        train, validation = carve_validation_indices(labels, validation_fraction)
        keep = train if split == "train" else validation
        images, labels = images[keep], labels[keep]
    if num_examples is not None:
        keep = balanced_prefix_indices(labels, num_examples)
        images, labels = images[keep], labels[keep]
    class_names = tuple(builder.info.features[label_key].names)
    return ImageDataset(images=images, labels=labels, class_names=class_names)
