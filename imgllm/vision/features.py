"""Images → CNN logits and features, the one chain that inference, captioner training and the demo share.

    uint8 [B,H,W,3] ─ resize to the CNN's size (if needed) ─ normalise (`imgllm.data.augment.normalize`)
      └─ CNN (inference mode) → logits [B, C], features [B, F] as the visual prefix reads them

`feature_source` names the features the CNN gives (`imgllm.vision.cnn.FEATURE_SOURCES`): "pooled" (its global
max-pool), "spatial" (its last block's map, flattened) or "pyramid" (the whitening stem and every block, each
max-pooled to the last block's grid).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgllm.data.augment import normalize
from imgllm.vision.cnn import FEATURE_SOURCES, max_pool_to_grid

__all__ = ["FEATURE_SOURCES", "cnn_outputs", "image_logits_and_features", "images_for_cnn", "max_pool_to_grid"]


def images_for_cnn(images: jax.Array, image_size: int, mean=None, std=None) -> jax.Array:
    """uint8 [B,H,W,3] → normalised float32 [B,S,S,3] at the CNN's resolution S (resized when H,W differ)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [batch, height, width, 3], got shape {images.shape}")
    if images.shape[1:3] != (image_size, image_size):
        resized = jax.image.resize(images.astype(jnp.float32), (images.shape[0], image_size, image_size, 3), "linear")
        images = jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
    return normalize(images, mean, std)


def image_logits_and_features(
    cnn: nn.Module,
    cnn_variables: Any,
    images: jax.Array,
    *,
    image_size: int,
    mean=None,
    std=None,
    feature_source: str = "pooled",
    flip_tta: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """uint8 images → (logits float32 [B, C], features [B, F]); with flip_tta the logits are averaged with the
    mirrored image's (the features are the unflipped image's)."""
    x = images_for_cnn(images, image_size, mean, std)
    logits, features = cnn_outputs(cnn, cnn_variables, x, feature_source)
    if flip_tta:
        mirrored, _ = cnn.apply(cnn_variables, x[:, :, ::-1, :], train=False)
        logits = (logits + mirrored) / 2
    return logits.astype(jnp.float32), features


def cnn_outputs(
    cnn: nn.Module, cnn_variables: Any, images_normalised: jax.Array, feature_source: str = "pooled"
) -> tuple[jax.Array, jax.Array]:
    """(logits [B, C], features [B, F]) of the CNN in inference mode, features as `feature_source` says
    (F = widths[-1] "pooled", h * w * widths[-1] "spatial", h * w * (whiten_width + sum(widths)) "pyramid")."""
    return cnn.apply(cnn_variables, images_normalised, train=False, feature_source=feature_source)
