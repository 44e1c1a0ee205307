"""Images → CNN logits and features, the one chain that inference, captioner training and the demo share.

    uint8 [B,H,W,3] ─ resize to the CNN's size (if needed) ─ normalise (`imgllm.data.augment.normalize`)
      └─ CNN (inference mode) → logits [B, C], features [B, F] as the visual prefix reads them

`feature_source` names the features: "pooled" (the CNN's global max-pool), "spatial" (its last block's map,
flattened) or "pyramid" (the whitening stem and every block, each max-pooled to the last block's grid).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgllm.data.augment import normalize
from imgllm.vision.cnn import conv2d

FEATURE_SOURCES = ("pooled", "spatial", "pyramid")


def images_for_cnn(images: jax.Array, image_size: int, mean=None, std=None) -> jax.Array:
    """uint8 [B,H,W,3] → normalised float32 [B,S,S,3] at the CNN's resolution S (resized when H,W differ)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [batch, height, width, 3], got shape {images.shape}")
    if images.shape[1:3] != (image_size, image_size):
        resized = jax.image.resize(images.astype(jnp.float32), (images.shape[0], image_size, image_size, 3),
                                   "linear")
        images = jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
    return normalize(images, mean, std)


def image_logits_and_features(cnn: nn.Module, cnn_variables: Any, images: jax.Array, *, image_size: int,
                              mean=None, std=None, feature_source: str = "pooled",
                              flip_tta: bool = False) -> tuple[jax.Array, jax.Array]:
    """uint8 images → (logits float32 [B, C], features [B, F]); with flip_tta the logits are averaged with the
    mirrored image's (the features are the unflipped image's)."""
    x = images_for_cnn(images, image_size, mean, std)
    logits, features = cnn_outputs(cnn, cnn_variables, x, feature_source)
    if flip_tta:
        mirrored, _ = cnn.apply(cnn_variables, x[:, :, ::-1, :], train=False)
        logits = (logits + mirrored) / 2
    return logits.astype(jnp.float32), features


def cnn_outputs(cnn: nn.Module, cnn_variables: Any, images_normalised: jax.Array,
                feature_source: str = "pooled") -> tuple[jax.Array, jax.Array]:
    """(logits [B, C], features [B, F]) of the CNN in inference mode, features as `feature_source` says.

    "spatial" and "pyramid" capture the outputs of the CNN's conv blocks (named `block1`..`block{len(widths)}`)
    with flax's capture_intermediates, so the CNN module needs no change. F = h * w * channels of the last block
    ("spatial"), or h * w * (whiten_width + sum(widths)) ("pyramid", see `whitening_stem_output`).
    """
    if feature_source not in FEATURE_SOURCES:
        raise ValueError(f"feature_source={feature_source!r}: expected one of {FEATURE_SOURCES}")
    if feature_source == "pooled":
        return cnn.apply(cnn_variables, images_normalised, train=False)
    blocks = [f"block{i + 1}" for i in range(len(cnn.widths))]
    wanted = blocks if feature_source == "pyramid" else blocks[-1:]
    (logits, _), captured = cnn.apply(cnn_variables, images_normalised, train=False,
                                      capture_intermediates=lambda module, _: module.name in wanted,
                                      mutable=["intermediates"])
    maps = [captured["intermediates"][name]["__call__"][0] for name in wanted]
    if feature_source == "pyramid":
        maps.insert(0, whitening_stem_output(cnn, cnn_variables, images_normalised))
    grid = maps[-1].shape[1:3]
    features = [max_pool_to_grid(feature_map, grid).reshape(feature_map.shape[0], -1) for feature_map in maps]
    return logits, jnp.concatenate(features, axis=-1)


def whitening_stem_output(cnn: nn.Module, cnn_variables: Any, images_normalised: jax.Array) -> jax.Array:
    """The CNN's whitening stem, GELU(conv2x2_VALID(x, whiten_kernel) + whiten_bias): [B, H-1, W-1, whiten_width].

    The stem is not a submodule of the CNN (capture_intermediates cannot see it), so it is recomputed here from
    the CNN's own parameters with its own conv2d; it is what CNN.__call__ computes before `block1`.
    """
    params = cnn_variables["params"]
    x = conv2d(images_normalised.astype(cnn.dtype), params["whiten_kernel"].astype(cnn.dtype), padding="VALID",
               impl=cnn.conv_impl)
    return nn.gelu(x + params["whiten_bias"].astype(cnn.dtype), approximate=False)


def max_pool_to_grid(feature_map: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Max-pools [B, H, W, C] to [B, gh, gw, C] over equal windows (H // gh, W // gw), dropping the remainder."""
    batch, height, width, channels = feature_map.shape
    wh, ww = height // grid[0], width // grid[1]
    cropped = feature_map[:, :wh * grid[0], :ww * grid[1]]
    return cropped.reshape(batch, grid[0], wh, grid[1], ww, channels).max(axis=(2, 4))
