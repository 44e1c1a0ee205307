"""Image data: sources (CIFAR-10 via tfds, image folders, generated demo shapes), batching, decoding.

Device-side augmentation lives in `imgllm.data.augment` (imported separately: it needs JAX, this
package does not, so image-decoding worker processes start fast).
"""

from imgllm.data.batching import PADDING_INDEX, epoch_batch_indices, epoch_permutation, gather_batch
from imgllm.data.dataset import ImageDataset, balanced_prefix_indices, carve_validation_indices
from imgllm.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    decode_image_files,
    list_image_files,
)
from imgllm.data.load import load_dataset

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "PADDING_INDEX",
    "ImageDataset",
    "ImageDecodeError",
    "balanced_prefix_indices",
    "carve_validation_indices",
    "decode_image",
    "decode_image_files",
    "epoch_batch_indices",
    "epoch_permutation",
    "gather_batch",
    "list_image_files",
    "load_dataset",
]
