"""Image-folder datasets: ``ROOT/<split>/<class>/<image file>``.

* Splits are the folders ``train``, ``validation`` (or ``val``/``valid``) and ``test``. A root that
  holds class folders directly (no split folders) is read as the ``train`` split.
* Class names are the sorted class-folder names of the train split, so a label means the same
  class in every split.
* Without a validation folder, ``validation`` is carved from ``train``: the last 10% of the files
  of every class in sorted-name order (`carve_validation_indices`); ``train`` then excludes them,
  and ``train_full`` gives every train file.
* Every image is resized to ``image_size`` (default: the size of the first image in the train split)
  so the pixels fit one rectangular uint8 array. Corrupt, truncated and non-image files are skipped
  with a warning naming them; a missing or empty folder, or a class without images, is an error.
* Decoding runs in parallel processes; with ``cache_dir`` the decoded arrays are kept as ``.npz``
  files keyed by the file list (paths, sizes, modification times) and the decoding options.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings

import numpy as np

from imgllm.data.dataset import (
    DEFAULT_VALIDATION_FRACTION,
    ImageDataset,
    balanced_prefix_indices,
    carve_validation_indices,
)
from imgllm.data.images import (
    Size,
    as_size,
    decode_image_files,
    first_decodable_size,
    has_image_extension,
    list_image_files,
)

SPLIT_FOLDER_NAMES = {"train": ("train",), "validation": ("validation", "val", "valid"), "test": ("test",)}
SPLITS = ("train", "validation", "test", "train_full")
_CACHE_FORMAT = 1


class DataFolderError(ValueError):
    """The image folder does not have the expected layout; the message names the folder at fault."""


def _find_split_folder(root: str, split: str) -> str | None:
    for name in SPLIT_FOLDER_NAMES[split]:
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    return None


def _class_folders(split_folder: str) -> list[str]:
    """Sorted names of the visible sub-folders of a split folder; an error when there are none."""
    if not os.path.isdir(split_folder):
        raise FileNotFoundError(f"image folder not found: {split_folder!r}")
    entries = sorted(e for e in os.listdir(split_folder) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(split_folder, e))]
    if not classes:
        loose = [e for e in entries if has_image_extension(e)]
        hint = f" (it holds {len(loose)} image files directly)" if loose else ""
        raise DataFolderError(
            f"no class folders in {split_folder!r}{hint}; expected the layout {split_folder}/<class>/<image file>"
        )
    loose = [e for e in entries if e not in classes and has_image_extension(e)]
    if loose:
        warnings.warn(
            f"ignoring {len(loose)} image files outside class folders in {split_folder!r}, e.g. {loose[0]!r}",
            stacklevel=2,
        )
    return classes


def _scan_split(split_folder: str, class_names: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Image paths (sorted by class, then file name) and their labels; errors for empty or unknown classes."""
    paths, labels = [], []
    for class_name in _class_folders(split_folder):
        if class_name not in class_names:
            raise DataFolderError(
                f"class folder {os.path.join(split_folder, class_name)!r} is not a class of the train split "
                f"(classes: {', '.join(class_names)})"
            )
        files = list_image_files(os.path.join(split_folder, class_name), recursive=True)
        if not files:
            class_folder = os.path.join(split_folder, class_name)
            raise DataFolderError(f"class {class_name!r} has no image files in {class_folder!r}")
        paths += files
        labels += [class_names.index(class_name)] * len(files)
    return paths, np.array(labels, dtype=np.int32)


def _split_layout(root: str) -> dict[str, str]:
    """Maps split names to folders; a root without split folders is itself the train split."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root!r}")
    folders = {split: folder for split in SPLIT_FOLDER_NAMES if (folder := _find_split_folder(root, split))}
    return folders or {"train": root}


def _select_split_files(
    root: str, split: str, validation_fraction: float
) -> tuple[list[str], np.ndarray, tuple[str, ...], str]:
    """(paths, labels, class names, reference folder) of `split`, carving validation from train if needed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for an image folder; use one of {SPLITS}")
    layout = _split_layout(root)
    reference = layout.get("train") or next(iter(layout.values()))
    class_names = tuple(_class_folders(reference))
    wanted = "train" if split == "train_full" else split
    if wanted in layout and not (split == "train" and "validation" not in layout):
        paths, labels = _scan_split(layout[wanted], class_names)
        return paths, labels, class_names, reference
    if split == "test" or "train" not in layout:
        raise DataFolderError(f"no {split!r} split folder in {root!r} (found: {', '.join(sorted(layout)) or 'none'})")
    paths, labels = _scan_split(layout["train"], class_names)
    train, validation = carve_validation_indices(labels, validation_fraction)
    keep = train if split == "train" else validation
    return [paths[i] for i in keep], labels[keep], class_names, reference


def _cache_file(cache_dir: str, paths: list[str], size: Size | None, resize: str) -> str:
    """Cache file name from everything the decoded array depends on."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": _CACHE_FORMAT, "size": size, "resize": resize}).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"\n{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return os.path.join(cache_dir, f"imgllm-folder-{digest.hexdigest()[:24]}.npz")


def _decode_cached(
    paths: list[str], size: Size | None, resize: str, cache_dir: str | None, num_workers: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """`decode_image_files`, reading or writing the result under `cache_dir` when one is given."""
    if cache_dir is None:
        return decode_image_files(paths, size, resize=resize, num_workers=num_workers)
    cache_file = _cache_file(cache_dir, paths, size, resize)
    if os.path.exists(cache_file):
        with np.load(cache_file) as cached:
            images, kept = cached["images"], cached["kept"]
        for path in (p for p, k in zip(paths, kept) if not k):
            warnings.warn(
                f"skipping: cannot decode image file {path!r} (remembered in cache {cache_file!r})", stacklevel=2
            )
        return images, kept
    images, kept = decode_image_files(paths, size, resize=resize, num_workers=num_workers)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".npz.tmp", delete=False) as tmp:
        np.savez(tmp, images=images, kept=kept)
    os.replace(tmp.name, cache_file)  # atomic: a concurrent reader never sees half a file
    return images, kept


def load_image_folder(
    root: str,
    split: str,
    *,
    image_size: int | tuple[int, int] | None = None,
    num_examples: int | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    resize: str = "crop",
    cache_dir: str | None = None,
    num_workers: int | None = None,
) -> ImageDataset:
    """Reads `split` of the image folder at `root` (layout in the module docstring).

    `num_examples` keeps a class-interleaved subset of that many files (`balanced_prefix_indices`)
    before decoding, so small runs decode little.
    """
    root = os.path.expanduser(os.fspath(root))
    paths, labels, class_names, reference = _select_split_files(root, split, validation_fraction)
    if num_examples is not None:
        keep = balanced_prefix_indices(labels, num_examples)
        paths, labels = [paths[i] for i in keep], labels[keep]
    size = as_size(image_size)
    if size is None:
        size = _reference_size(reference, class_names)
    images, kept = _decode_cached(paths, size, resize, cache_dir, num_workers)
    check_every_class_decoded(labels, kept, class_names, f"split {split!r} of {root!r}")
    labels = labels[kept]
    paths = [p for p, k in zip(paths, kept) if k]
    return ImageDataset(images=images, labels=labels, class_names=class_names, paths=tuple(paths))


def check_every_class_decoded(labels: np.ndarray, kept: np.ndarray, class_names: tuple[str, ...], where: str) -> None:
    """Raises DataFolderError when a class that had files among `labels` kept none of them after decoding.

    Such a class would silently vanish from training (its label never appears), so it is refused whatever the
    subset size; a class absent because a small `num_examples` subset did not reach it is not an error.
    """
    if not kept.any():
        raise DataFolderError(f"no decodable images in {where}")
    lost = sorted(set(labels.tolist()) - set(labels[kept].tolist()))
    if lost:
        raise DataFolderError(
            f"class {class_names[lost[0]]!r} has no decodable images in {where} "
            f"({int((labels == lost[0]).sum())} files, none could be read)"
        )


def _reference_size(reference_folder: str, class_names: tuple[str, ...]) -> Size:
    """(height, width) of the first decodable image of the reference (train) split."""
    for class_name in class_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # files are listed (and warned about) again when the split is read
            files = list_image_files(os.path.join(reference_folder, class_name), recursive=True)
        size = first_decodable_size(files)
        if size is not None:
            return size
    raise DataFolderError(f"no decodable image in {reference_folder!r}")
