"""Decoding image files of any mode and size into uint8 RGB arrays, one file or many in parallel.

`decode_image` is the single place where a file becomes pixels: the image-folder source uses it for
datasets and `infer.py` for arbitrary user photos. Only numpy and Pillow are imported here, so worker
processes that decode in parallel start quickly (no JAX, no TensorFlow).
"""

from __future__ import annotations

import collections
import json
import os
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
RESIZE_MODES = ("crop", "stretch")
# The most pixels `decode_image` decodes by default: 40 megapixels, 120 MB as RGB, more than most cameras write.
# Pillow refuses only above 179 million, so without it a 140 KB PNG of 12000x12000 costs each decoding worker
# about 0.6 GB. JPEGs decoded at a reduced draft scale count at that scale.
DEFAULT_MAX_PIXELS = 40_000_000
# Below this many files, decoding in this process beats starting worker processes.
_PARALLEL_MIN_FILES = 2048

Size = tuple[int, int]  # (height, width)


class ImageDecodeError(ValueError):
    """A file could not be read as an image; the message names the file and the reason."""


def as_size(size: int | Sequence[int] | None) -> Size | None:
    """Normalises an image size argument: int s -> (s, s); (h, w) -> (h, w); None stays None."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return height, width


def has_image_extension(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def directory_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the directory `path` leads to, symlinks resolved; None when it cannot be read."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def walk_folders(top: str, *, recursive: bool = True) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) for `top` and, when recursive, each non-hidden folder below it.

    Symlinked folders are followed, but every real folder is entered once (tracked by device and inode), so a
    link back to a parent cannot make the walk endless. Links are followed only after every folder reachable
    without one has been walked (each part depth-first in sorted order), so a folder reached both ways is
    listed under its own path. Folders that cannot be read are skipped, as `os.walk` skips them.
    """
    seen: set[tuple[int, int]] = set()
    stack, links = [top], collections.deque()
    while stack or links:
        folder = stack.pop() if stack else links.popleft()
        identity = directory_identity(folder)
        if identity is None or identity in seen:
            continue
        seen.add(identity)
        try:
            with os.scandir(folder) as iterator:
                entries = sorted(iterator, key=lambda entry: entry.name)
        except OSError:
            continue
        yield folder, [entry.name for entry in entries if not is_folder_entry(entry)]
        if recursive:
            folders = [entry for entry in entries if is_folder_entry(entry) and not entry.name.startswith(".")]
            links.extend(entry.path for entry in folders if entry.is_symlink())
            stack.extend(reversed([entry.path for entry in folders if not entry.is_symlink()]))


def is_folder_entry(entry: os.DirEntry) -> bool:
    """Whether a directory entry is a folder, following symlinks (a broken link counts as a file)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def list_image_files(
    path: str | os.PathLike, *, recursive: bool = False, quiet_extensions: Sequence[str] = ()
) -> list[str]:
    """Image files at `path`: the file itself, or the image files in a folder, sorted by name.

    Hidden files (".DS_Store", "._x.jpg") are ignored; other files without an image extension are
    skipped with a warning naming them, except those ending with one of `quiet_extensions` (lower case,
    e.g. ".jsonl"), which are skipped silently. Symlinked sub-folders are followed, each real folder once
    (see `walk_folders`). Raises FileNotFoundError when `path` does not exist.
    """
    quiet_extensions = tuple(extension.lower() for extension in quiet_extensions)
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such image file or folder: {path!r}")
    found = []
    for folder, names in walk_folders(path, recursive=recursive):
        for name in names:
            if name.startswith("."):
                continue
            file_path = os.path.join(folder, name)
            if has_image_extension(name):
                found.append(file_path)
            elif not name.lower().endswith(quiet_extensions):
                extensions = ", ".join(IMAGE_EXTENSIONS)
                warnings.warn(f"skipping {file_path!r}: not an image file ({extensions})", stacklevel=2)
    return sorted(found)


def _rescale_to_uint8(image: Image.Image) -> np.ndarray:
    """Single-channel 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") pixels -> uint8 0..255.

    16-bit data is divided by 257 (65535 -> 255). "I" images hold 16-bit files in most Pillow
    versions, so they are rescaled the same way when any value exceeds 255; float images in [0, 1]
    are multiplied by 255; anything else is clipped.
    """
    array = np.asarray(image).astype(np.float64)
    peak = array.max() if array.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
        array = array / 257.0
    elif image.mode == "F" and peak <= 1.0:
        array = array * 255.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB": greyscale and palette are expanded, 16-bit and float rescaled,
    and transparency composited over white (so transparent pixels do not show hidden colours)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        grey = _rescale_to_uint8(image)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _crop_box(width: int, height: int, target: Size) -> tuple[float, float, float, float]:
    """The largest centred box of `target`'s aspect ratio inside a width x height image."""
    target_height, target_width = target
    scale = min(width / target_width, height / target_height)
    box_width, box_height = target_width * scale, target_height * scale
    left, top = (width - box_width) / 2, (height - box_height) / 2
    return (left, top, left + box_width, top + box_height)


def _draft_for(image: Image.Image, size: Size | None) -> None:
    """Lets libjpeg decode a big photo at 1/2, 1/4 or 1/8 scale when that still covers `size` (header only).

    Draft mode only reduces by powers of two, and only an image at least twice the target in both sides is
    drafted, so small JPEGs (CIFAR's 32x32 at size 32) decode to exactly the pixels they decode to without it.
    """
    if size is not None and image.format == "JPEG" and image.width >= 2 * size[1] and image.height >= 2 * size[0]:
        scale = max(size[1] / image.width, size[0] / image.height)
        image.draft("RGB", (int(np.ceil(image.width * scale)), int(np.ceil(image.height * scale))))


def check_pixel_count(path: str, image: Image.Image, max_pixels: int | None) -> None:
    """Raise ImageDecodeError when `image` (opened, not yet decoded) would decode to more than `max_pixels` pixels.

    Its size comes from the file header, so a decompression bomb (a tiny file that expands to gigabytes) is
    refused before any pixel is decoded. None means no limit.
    """
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageDecodeError(
            f"image file {path!r} is {image.width}x{image.height} = {image.width * image.height:,} pixels, more "
            f"than the limit of {max_pixels:,} (max_pixels; None lifts it)"
        )


def open_regular_file(path: str):
    """`path` opened for reading in binary, only when it is a regular file: it is opened without blocking and
    checked first, so a FIFO, a device or a socket (which can block a reader for ever) raises ImageDecodeError."""
    file = open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))  # noqa: SIM115
    try:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise ImageDecodeError(f"cannot read image file {path!r}: not a regular file (a pipe, device or socket)")
        os.set_blocking(file.fileno(), True)
        return file
    except BaseException:
        file.close()
        raise


def _open_and_resize(path: str, size: Size | None, resize: str, max_pixels: int | None) -> np.ndarray:
    with open_regular_file(path) as file, Image.open(file) as image:
        _draft_for(image, size)
        check_pixel_count(path, image, max_pixels)  # after the draft: counts the pixels libjpeg will decode
        image.load()
        if "exif" in image.info or hasattr(image, "tag_v2"):  # skips the EXIF parse for plain files
            image = ImageOps.exif_transpose(image)
        return fit_image(image, size, resize)


def fit_image(image: Image.Image, size: Size | None, resize: str = "crop") -> np.ndarray:
    """A Pillow image of any mode as uint8 RGB [H, W, 3], resized to `size` = (h, w) when given."""
    image = _to_rgb(image)
    if size is not None and image.size != (size[1], size[0]):
        box = _crop_box(image.width, image.height, size) if resize == "crop" else None
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def array_to_rgb(array: np.ndarray, size: Size | None = None, resize: str = "crop") -> np.ndarray:
    """An image array [H, W], [H, W, 1|3|4] (uint8 or uint16) as uint8 RGB [H, W, 3], resized to `size`."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 3 and array.dtype == np.uint8:
        if size is None or array.shape[:2] == size:
            return array  # already what is wanted: no copy
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16 and array.ndim == 2:
        image = Image.fromarray(array)  # mode "I;16"
    elif array.dtype == np.uint8 and (array.ndim == 2 or array.shape[-1] in (3, 4)):
        image = Image.fromarray(array)
    else:
        raise ValueError(f"cannot convert an image array of shape {array.shape} and dtype {array.dtype} to RGB")
    return fit_image(image, size, resize)


def decode_image(
    path: str | os.PathLike,
    size: int | Sequence[int] | None = None,
    *,
    resize: str = "crop",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Reads one image file of any mode into uint8 RGB [H, W, 3], resized to `size` when given.

    Greyscale, palette, CMYK, 16-bit and floating-point images are converted to 8-bit RGB; alpha is
    composited over white; the EXIF orientation of photos is applied. With `size` (int or (h, w)),
    `resize="crop"` takes the largest centred crop of the target aspect ratio and resizes it (no
    distortion); `resize="stretch"` resizes the whole image. Raises `ImageDecodeError` naming the
    file for a missing, truncated, corrupt or non-image file, and for one that would decode to more
    than `max_pixels` pixels (checked from its header before decoding; a big JPEG counts at the reduced
    scale libjpeg decodes it at for a small `size`; None: no limit).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if max_pixels is not None and (not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    path = os.fspath(path)
    size = as_size(size)
    try:
        array = _open_and_resize(path, size, resize, max_pixels)
    except ImageDecodeError:
        raise
    except FileNotFoundError as error:
        raise ImageDecodeError(f"cannot read image file {path!r}: no such file") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"cannot decode image file {path!r}: {error}") from error
    if array.ndim != 3 or array.shape[-1] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(f"image file {path!r} decoded to an unusable shape {array.shape}")
    return array


def decode_files_in_process(
    paths: Sequence[str], size: Size | None, resize: str = "crop"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decodes `paths` in this process: (uint8 images of the files that decoded, kept mask, error messages)."""
    images, kept, errors = [], np.zeros(len(paths), dtype=bool), []
    for index, path in enumerate(paths):
        try:
            image = decode_image(path, size, resize=resize)
        except ImageDecodeError as error:
            errors.append(str(error))
            continue
        if size is None:
            size = image.shape[:2]  # the first image that decodes fixes the size of the rest
        images.append(image)
        kept[index] = True
    height, width = size if size is not None else (0, 0)
    stacked = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
    return stacked, kept, errors


def default_num_workers() -> int:
    """Decoding processes to use: the CPUs this process may run on, at most 32."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 32))


def _decode_in_subprocesses(
    paths: list[str], size: Size, resize: str, num_workers: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`decode_files_in_process` split over `num_workers` fresh Python processes, a contiguous shard each.

    Fresh interpreters (`python -m imgllm.data._decode_worker`) import only numpy and Pillow; unlike
    multiprocessing's fork they are safe next to JAX's threads, and unlike its spawn they never
    re-run the caller's main script. Requests and results travel as files in a temporary folder;
    workers still running when anything goes wrong (Ctrl-C included) are killed.
    """
    shards = [s for s in np.array_split(np.arange(len(paths)), num_workers) if len(s)]
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="imgllm-decode-") as tmp:
        file = lambda kind, number: os.path.join(tmp, f"{kind}-{number}")  # noqa: E731
        workers = []
        try:
            for number, shard in enumerate(shards):
                with open(file("request", number), "w") as request:
                    json.dump({"paths": [paths[i] for i in shard], "size": size, "resize": resize}, request)
                with open(file("log", number), "w") as log:
                    command = [sys.executable, "-m", "imgllm.data._decode_worker"]
                    command += [file("request", number), file("result", number) + ".npz"]
                    workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
            for number, worker in enumerate(workers):
                if worker.wait() != 0:
                    with open(file("log", number)) as log:
                        message = f"image decoding worker failed (exit code {worker.returncode}):\n{log.read()[-4000:]}"
                    raise RuntimeError(message)
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
        parts = []
        for number in range(len(workers)):
            with np.load(file("result", number) + ".npz") as result:
                parts.append((result["images"], result["kept"], [str(e) for e in result["errors"]]))
    return (
        np.concatenate([images for images, _, _ in parts]),
        np.concatenate([kept for _, kept, _ in parts]),
        [error for _, _, errors in parts for error in errors],
    )


def decode_image_files(
    paths: Sequence[str],
    size: int | Sequence[int] | None = None,
    *,
    resize: str = "crop",
    num_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes many files into one uint8 [N, H, W, 3] array, skipping bad files with a warning.

    All images are resized to `size`; when `size` is None, to the size of the first file that
    decodes. Returns (images, kept) where `kept` is a bool [len(paths)] mask of the files that
    decoded. Lists of more than a few thousand files are decoded by `num_workers` processes
    (default: one per CPU, see `_decode_in_subprocesses`).
    """
    paths = [os.fspath(p) for p in paths]
    size = as_size(size)
    if size is None:
        size = first_decodable_size(paths)
    num_workers = default_num_workers() if num_workers is None else max(1, int(num_workers))
    if num_workers == 1 or len(paths) < _PARALLEL_MIN_FILES or size is None:
        images, kept, errors = decode_files_in_process(paths, size, resize)
    else:
        images, kept, errors = _decode_in_subprocesses(paths, size, resize, num_workers)
    for message in errors:
        warnings.warn(f"skipping: {message}", stacklevel=2)
    return images, kept


def first_decodable_size(paths: Sequence[str]) -> Size | None:
    """(height, width) of the first file that decodes; None when none does (their errors come later)."""
    for path in paths:
        try:
            return decode_image(path).shape[:2]
        except ImageDecodeError:
            continue
    return None
