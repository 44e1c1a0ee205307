"""Images → CNN logits and features, the one chain that inference, classifier evaluation, captioner training and the
demo share.

    uint8 [B,H,W,3] ─ resize to the CNN's size (if needed) ─ normalise (`imgllm.data.augment.normalize`)
      └─ CNN (inference mode) → logits [B, C] (averaged over the test-time views `tta` names),
                                features [B, F] as the visual prefix reads them

Test-time views (`TTA_VIEWS`): "none"; "flip" (the image and its mirror); "flip_translate" (half "flip", half the
"flip" views of the image shifted by (1, 1) and (-1, -1) pixels with reflect padding).

`feature_source` names the features the CNN gives (`imgllm.vision.cnn.FEATURE_SOURCES`): "pooled" (its global
max-pool), "spatial" (its last block's map, flattened) or "pyramid" (the whitening stem and every block, each
max-pooled to the last block's grid).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgllm.data.augment import normalize, translate
from imgllm.vision.cnn import FEATURE_SOURCES, max_pool_to_grid

__all__ = [
    "FEATURE_SOURCES",
    "TTA_VIEWS",
    "cnn_outputs",
    "image_logits",
    "image_logits_and_features",
    "images_for_cnn",
    "max_pool_to_grid",
    "resized_for_cnn",
    "view_averaged_logits",
]

TTA_VIEWS = ("none", "flip", "flip_translate")


def images_for_cnn(images: jax.Array, image_size: int, mean=None, std=None) -> jax.Array:
    """uint8 [B,H,W,3] → normalised float32 [B,S,S,3] at the CNN's resolution S (resized when H,W differ)."""
    return normalize(resized_for_cnn(images, image_size), mean, std)


def resized_for_cnn(images: jax.Array, image_size: int) -> jax.Array:
    """uint8 [B,H,W,3] → uint8 [B,S,S,3] at the CNN's resolution S (resized, rounded, when H,W differ)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [batch, height, width, 3], got shape {images.shape}")
    if images.shape[1:3] != (image_size, image_size):
        resized = jax.image.resize(images.astype(jnp.float32), (images.shape[0], image_size, image_size, 3), "linear")
        images = jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
    return images


def image_logits_and_features(
    cnn: nn.Module,
    cnn_variables: Any,
    images: jax.Array,
    *,
    image_size: int,
    mean=None,
    std=None,
    feature_source: str = "pooled",
    tta: str = "none",
    flip_tta: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """uint8 images → (logits float32 [B, C], features [B, F]); the logits are averaged over the test-time views
    `tta` names (`TTA_VIEWS`; flip_tta=True is tta="flip"), the features are the unaltered image's."""
    tta = "flip" if flip_tta and tta == "none" else tta
    images = resized_for_cnn(images, image_size)
    logits, features = cnn_outputs(cnn, cnn_variables, normalize(images, mean, std), feature_source)
    view_logits = lambda view: cnn.apply(cnn_variables, normalize(view, mean, std), train=False)[0]
    return view_averaged_logits(view_logits, images, tta, logits).astype(jnp.float32), features


def image_logits(
    cnn: nn.Module, cnn_variables: Any, images: jax.Array, *, image_size: int, mean=None, std=None, tta: str = "none"
) -> jax.Array:
    """uint8 images → logits float32 [B, C], averaged over the test-time views `tta` names (`TTA_VIEWS`): the
    classifier's evaluation, calibration and confusion matrix, as `image_logits_and_features` gives them."""
    return image_logits_and_features(cnn, cnn_variables, images, image_size=image_size, mean=mean, std=std, tta=tta)[0]


def view_averaged_logits(
    view_logits: Callable[[jax.Array], jax.Array], x: jax.Array, tta: str, logits: jax.Array | None = None
) -> jax.Array:
    """The mean of view_logits(view) over the test-time views of images x [B,H,W,3] (module doc); `logits`:
    view_logits(x) when already computed. The views move pixels only: they are taken of the uint8 images, before
    normalisation, as the classifier's evaluation has always taken them (the same logits to the bit)."""
    if tta not in TTA_VIEWS:
        raise ValueError(f"tta={tta!r}: expected one of {TTA_VIEWS}")
    logits = view_logits(x) if logits is None else logits
    if tta == "none":
        return logits

    def mirrored(view, own=None):  # the mean of a view's logits (`own`, when known) and its mirror image's
        own = view_logits(view) if own is None else own
        return 0.5 * (own + view_logits(view[:, :, ::-1, :]))

    logits = mirrored(x, logits)
    if tta == "flip_translate":
        shifted = 0.5 * (mirrored(translate(x, 1, 1)) + mirrored(translate(x, -1, -1)))
        logits = 0.5 * (logits + shifted)
    return logits


def cnn_outputs(
    cnn: nn.Module, cnn_variables: Any, images_normalised: jax.Array, feature_source: str = "pooled"
) -> tuple[jax.Array, jax.Array]:
    """(logits [B, C], features [B, F]) of the CNN in inference mode, features as `feature_source` says
    (F = widths[-1] "pooled", h * w * widths[-1] "spatial", h * w * (whiten_width + sum(widths)) "pyramid")."""
    return cnn.apply(cnn_variables, images_normalised, train=False, feature_source=feature_source)
