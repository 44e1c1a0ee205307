"""The common case in one call: captions and labels of images given as paths, PIL images or arrays.

    from imgllm.pipeline import ImageToText

    captioner = ImageToText("runs/demo/pipeline")               # a pipeline checkpoint directory
    captioner(["photo.jpg", pil_image, uint8_array])             # -> one dict per image, in order:
    # [{"path": "photo.jpg", "labels": [{"label": "cat", "prob": 0.97}], "captions": ["a cat on a sofa."],
    #   "caption_scores": [-4.1]}, {"path": "<image 1>", ...}, ...]

Each dict is the record `infer.py` writes for the image (`imgllm.pipeline.records`); an input that cannot be read
gives {"path", "error"} and the others are still captioned. Images go through in batches of `batch_size`, batch i
with the random key fold_in(PRNGKey(seed), i), as `caption_files` does, so both give the same records for the same
`CaptionOptions`:

    captioner = ImageToText("runs/demo/pipeline", CaptionOptions(method="sample", num_captions=3, batch_size=16))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from imgllm.data.images import DEFAULT_MAX_PIXELS, array_to_rgb, as_size, decode_image
from imgllm.pipeline.batch import batch_records
from imgllm.pipeline.caption import inference_params, make_captioner
from imgllm.pipeline.checkpoint import PipelineCheckpoint, load_pipeline
from imgllm.pipeline.inputs import Batch, Item
from imgllm.pipeline.options import CaptionOptions

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def image_pixels(image: ImageInput, size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 [size, size, 3] pixels of a path, a PIL image or an array [H, W(, 1|3|4)], resized as files are."""
    if isinstance(image, (str, os.PathLike)):
        return decode_image(image, size, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return array_to_rgb(np.asarray(image.convert("RGB")), as_size(size))
    if isinstance(image, np.ndarray):
        return array_to_rgb(image, as_size(size))
    raise TypeError(f"an image must be a path, a PIL image or a numpy array, got {type(image).__name__}")


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image, a sequence of them, or a uint8 batch [N, H, W, 3] as a list of images."""
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


class ImageToText:
    """A pipeline checkpoint loaded once and called on images; see the module docstring.

    options: what is computed, as in `caption_files` (`CaptionOptions`; None: its defaults, greedy with the
    checkpoint's template and labels); its batch_size is the images per compiled call (fewer when fewer are given).
    max_pixels: a path to an image with more pixels than this gets an error record (None: no limit).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | PipelineCheckpoint,
        options: CaptionOptions | None = None,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.options = CaptionOptions() if options is None else options
        self.pipeline = checkpoint if isinstance(checkpoint, PipelineCheckpoint) else load_pipeline(checkpoint)
        self.spec = self.pipeline.spec_for(self.options)
        self.max_pixels = max_pixels
        self._params = inference_params(self.pipeline.params)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> list[dict[str, Any]]:
        """One record per image, in order (see the module docstring)."""
        images = as_image_list(images)
        captioner = make_captioner(self.spec)
        batch_size = max(1, min(self.options.batch_size, len(images)))
        records = []
        for index, start in enumerate(range(0, len(images), batch_size)):
            batch = self._batch(index, images[start : start + batch_size], start, batch_size)
            result = None
            if len(batch.errors) < len(batch.items):
                key = jax.random.fold_in(jax.random.PRNGKey(self.options.seed), index)
                result = captioner(self._params, batch.images, key)
            records += batch_records(self.pipeline, batch, result, lm_label_names=self.spec.lm_label_names)
        return records

    def _batch(self, index: int, images: list[ImageInput], start: int, batch_size: int) -> Batch:
        """The pixels of a batch of inputs (zero rows for padding and for inputs that could not be read)."""
        size = self.spec.image_size
        pixels = np.zeros((batch_size, size, size, 3), np.uint8)
        items, errors = [], {}
        for row, image in enumerate(images):
            is_path = isinstance(image, (str, os.PathLike))
            items.append(Item(os.fspath(image) if is_path else f"<image {start + row}>"))
            try:
                pixels[row] = image_pixels(image, size, max_pixels=self.max_pixels)
            except (OSError, ValueError, TypeError) as error:
                errors[row] = f"{type(error).__name__}: {error}"
        return Batch(index=index, items=items, images=pixels, errors=errors)


__all__ = ["ImageToText", "as_image_list", "image_pixels"]
