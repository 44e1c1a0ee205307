"""`load_dataset`: one entry point for every image source, chosen by a short spec string."""

from __future__ import annotations

import os

from imgllm.data.dataset import DEFAULT_VALIDATION_FRACTION, ImageDataset
from imgllm.data.demo import generate_demo
from imgllm.data.folder import load_image_folder
from imgllm.data.tfds_source import load_tfds

SPEC_FORMS = ('"cifar10"', '"tfds:<name>"', '"folder:<root>"', '"demo"')


def load_dataset(
    spec: str,
    split: str,
    *,
    seed: int = 0,
    data_dir: str | None = None,
    image_size: int | None = None,
    num_examples: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    cache_dir: str | None = None,
    num_workers: int | None = None,
) -> ImageDataset:
    """Loads `split` ("train", "validation", "test"; also "train_full") of the source `spec`.

    spec:
      "cifar10" / "tfds:<name>"  TensorFlow Datasets, stored under `data_dir` (tfds default when None);
                                 validation is carved from train when the dataset has none.
      "folder:<root>"            ROOT/<split>/<class>/<image>; a relative root is resolved against
                                 `data_dir` when given; `cache_dir` keeps decoded arrays.
      "demo"                     generated shapes with captions; `seed` picks the images.
    `image_size` resizes every image to image_size x image_size (default: the source's own size;
    32 for the demo). `num_examples` keeps a class-balanced, deterministic subset (the demo
    generates exactly that many). Only the demo uses `seed`; file sources are deterministic by order.
    """
    kind, _, argument = spec.partition(":")
    if spec == "demo":
        return generate_demo(split, seed=seed, num_examples=num_examples, image_size=image_size)
    if spec == "cifar10" or (kind == "tfds" and argument):
        return load_tfds(
            argument or spec,
            split,
            data_dir=data_dir,
            image_size=image_size,
            num_examples=num_examples,
            validation_fraction=validation_fraction,
        )
    if kind == "folder" and argument:
        root = os.path.join(data_dir, argument) if data_dir else argument
        return load_image_folder(
            root,
            split,
            image_size=image_size,
            num_examples=num_examples,
            validation_fraction=validation_fraction,
            cache_dir=cache_dir,
            num_workers=num_workers,
        )
    raise ValueError(f"unknown dataset spec {spec!r}; use one of {', '.join(SPEC_FORMS)}")
