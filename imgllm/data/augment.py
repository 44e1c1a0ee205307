"""Device-side image augmentation and normalisation: pure `jax.numpy`, meant to run inside `jit`.

    normalize                      uint8 pixels -> the CNN's normalised float32 input (the one normalisation)
    random_translate, random_flip  per-image random shift (reflect padding) and mirror; random_crop_flip: both
    alternating_flip               airbench's flip: a fixed orientation per image, mirrored on odd epochs
    translate                      a fixed shift of every image (test-time augmentation views)

Batches travel to the device as uint8 (4x less host-to-device traffic than float32) and are
augmented and normalised there, as part of the jitted train step. Randomness comes only from the
explicit key, so the same key gives the same batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Per-channel mean and standard deviation of the CIFAR-10 training pixels, on the [0, 1] scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def normalize(images_uint8: jax.Array, mean=None, std=None) -> jax.Array:
    """uint8 [..., 3] pixels -> float32 ``(pixels / 255 - mean) / std`` per channel (None: CIFAR-10's).

    The one normalisation of imgllm: training, evaluation, captioner features and inference all call it."""
    mean = jnp.asarray(CIFAR10_MEAN if mean is None else mean, jnp.float32)
    std = jnp.asarray(CIFAR10_STD if std is None else std, jnp.float32)
    return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std


def random_translate(rng: jax.Array, images: jax.Array, pad: int) -> jax.Array:
    """Shifts each image by its own random (dy, dx) in [-pad, pad]^2, filling the border by reflection.

    Equivalent to reflect-padding by `pad` and taking a random crop of the original size.
    """
    batch, height, width, channels = images.shape
    if pad == 0:
        return images
    if not 0 < pad < min(height, width):
        raise ValueError(f"pad must be in [0, {min(height, width)}) for {height}x{width} images, got {pad}")
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    offsets = jax.random.randint(rng, (batch, 2), 0, 2 * pad + 1)

    def crop(image, offset):
        return lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def random_crop_flip(rng: jax.Array, images: jax.Array, *, pad: int = 2, flip: bool = True) -> jax.Array:
    """The standard CIFAR augmentation: random translate by up to `pad` pixels (reflect padding),
    then a random horizontal flip, each drawn per image. Same dtype and shape as `images` [B, H, W, C]."""
    translate_key, flip_key = jax.random.split(rng)
    images = random_translate(translate_key, images, pad)
    return random_flip(flip_key, images) if flip else images


def alternating_flip(images: jax.Array, indices: jax.Array, epoch: jax.Array, seed: int) -> jax.Array:
    """airbench's alternating flip: each image has a fixed random orientation from (seed, index) and is
    mirrored on odd epochs, so over two epochs every image is seen both ways (more diverse than coin flips)."""
    base = jax.random.PRNGKey(seed)
    coin = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(base, i)))(indices)
    flip = jnp.logical_xor(coin, (epoch % 2) == 1)
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def translate(images: jax.Array, dy: int, dx: int) -> jax.Array:
    """Shifts images by (dy, dx) pixels with reflect padding (test-time augmentation views)."""
    pad = max(abs(dy), abs(dx))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = images.shape[1:3]
    return padded[:, pad - dy : pad - dy + h, pad - dx : pad - dx + w, :]
