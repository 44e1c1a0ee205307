"""Tests of imgllm.data.augment: device-side, jitted augmentation and normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgllm.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    alternating_flip,
    normalize,
    random_crop_flip,
    random_translate,
    translate,
)

jax.config.update("jax_enable_x64", False)


def _images(batch=16, height=6, width=5):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)


def test_normalize_matches_the_formula():
    images = _images()
    expected = (images / 255.0 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    out = jax.jit(normalize)(images)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float32])
def test_crop_flip_keeps_shape_and_dtype_and_is_deterministic(dtype):
    images = jnp.asarray(_images(), dtype)
    augment = jax.jit(lambda key, x: random_crop_flip(key, x, pad=2))
    a = augment(jax.random.key(1), images)
    assert a.shape == images.shape and a.dtype == images.dtype
    np.testing.assert_array_equal(a, augment(jax.random.key(1), images))
    assert not np.array_equal(a, augment(jax.random.key(2), images))


def test_flip_mirrors_some_images_and_leaves_the_others():
    images = _images(batch=64)
    out = np.asarray(jax.jit(lambda k, x: random_crop_flip(k, x, pad=0))(jax.random.key(3), images))
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, images)])
    assert (flipped ^ kept).all()  # each image is exactly one of the two
    assert 10 < flipped.sum() < 54
    no_flip = random_crop_flip(jax.random.key(3), images, pad=0, flip=False)
    np.testing.assert_array_equal(no_flip, images)


def test_translate_is_a_crop_of_the_reflect_padded_image_at_every_offset():
    pad, images = 2, _images(batch=200)
    out = np.asarray(jax.jit(lambda k, x: random_translate(k, x, pad))(jax.random.key(4), images))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    height, width = images.shape[1:3]
    seen = set()
    for o, p in zip(out, padded):
        offsets = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(o, p[dy : dy + height, dx : dx + width])
        ]
        assert offsets, "output is not a crop of the reflect-padded image"
        seen.update(offsets)
    assert len(seen) == (2 * pad + 1) ** 2  # every shift in [-pad, pad]^2 occurs


def test_translate_rejects_a_pad_as_large_as_the_image():
    with pytest.raises(ValueError, match="pad"):
        random_translate(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), 4)


def test_alternating_flip_mirrors_on_odd_epochs():
    images = jnp.arange(4 * 2 * 3 * 3, dtype=jnp.uint8).reshape(4, 2, 3, 3)
    indices = jnp.arange(4)
    even, odd = (alternating_flip(images, indices, jnp.int32(e), seed=0) for e in (0, 1))
    np.testing.assert_array_equal(np.asarray(odd), np.asarray(even)[:, :, ::-1, :])
    np.testing.assert_array_equal(alternating_flip(images, indices, jnp.int32(2), seed=0), even)


def test_translate_shifts_with_reflection():
    image = jnp.arange(16.0).reshape(1, 4, 4, 1)
    shifted = translate(image, 1, 1)
    np.testing.assert_array_equal(shifted[0, 1:, 1:, 0], image[0, :3, :3, 0])
