"""The in-memory dataset type shared by every source, and the deterministic ways to split it.

Pixels are decoded once into one uint8 array; everything after that (batching, augmentation,
normalisation) works on indices into it or runs on the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_VALIDATION_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Decoded images with integer labels (and, for some sources, captions and file paths)."""

    images: np.ndarray  # uint8 [N, H, W, 3], decoded once
    labels: np.ndarray  # int32 [N]
    class_names: tuple[str, ...]
    captions: tuple[tuple[str, ...], ...] | None = None  # per image, >= 1 reference caption
    paths: tuple[str, ...] | None = None  # source file per image, when from files

    def __post_init__(self):
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ImageDataset.images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        if labels.dtype != np.int32 or labels.shape != (len(images),):
            raise ValueError(f"ImageDataset.labels must be int32 [{len(images)}], got {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(
                f"ImageDataset.labels must lie in [0, {len(self.class_names)}), got [{labels.min()}, {labels.max()}]"
            )
        for name, per_image in (("captions", self.captions), ("paths", self.paths)):
            if per_image is not None and len(per_image) != len(images):
                raise ValueError(f"ImageDataset.{name} has {len(per_image)} entries for {len(images)} images")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, indices) -> ImageDataset:
        """The examples at `indices` (in that order), with their captions and paths."""
        indices = np.asarray(indices, dtype=np.int64)
        pick = lambda values: None if values is None else tuple(values[i] for i in indices)  # noqa: E731
        return ImageDataset(
            images=self.images[indices],
            labels=self.labels[indices],
            class_names=self.class_names,
            captions=pick(self.captions),
            paths=pick(self.paths),
        )


def carve_validation_indices(
    labels: np.ndarray, validation_fraction: float = DEFAULT_VALIDATION_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Splits example indices into (train, validation), class-balanced and without randomness.

    For each class, the *last* ``round(validation_fraction * n_class)`` examples in the given order
    (at least one when the class has two or more) go to validation; the rest stay in train. The result
    does not depend on any seed, so the validation set is the same for every run. Both index arrays
    come back in ascending order. For the CIFAR-10 training folder (5,000 sorted files per class) and
    the default fraction 0.1 this holds out the last 500 files of every class.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    labels = np.asarray(labels)
    validation = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(validation_fraction * len(members)))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        validation.append(members[len(members) - count :])
    validation = np.sort(np.concatenate(validation)) if validation else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), validation)
    return train, validation


def balanced_prefix_indices(labels: np.ndarray, num_examples: int) -> np.ndarray:
    """The first `num_examples` indices of a class-interleaved order, returned in ascending order.

    Takes the first example of every class, then the second of every class, and so on, so a small
    subset (e.g. for a quick test run) covers all classes evenly. Deterministic; no seed.
    """
    labels = np.asarray(labels)
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if num_examples >= len(labels):
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    first_of_class = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class = np.arange(len(labels)) - first_of_class
    interleaved = order[np.lexsort((sorted_labels, rank_in_class))]
    return np.sort(interleaved[:num_examples])
