"""The image classifier: an airbench94-style CIFAR-10 CNN in pure flax.linen.

Architecture (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498):

    x [B,32,32,3] normalised
    └─ whitening stem: conv 2x2 VALID, 3 -> 24 (= ± the 12 eigenvectors of the 2x2 patch covariance), + bias, GELU
       └─ 3 conv blocks, widths (64, 256, 256), each:
            conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU
          └─ global max-pool -> features [B, 256]
             └─ linear head (no bias) x 1/9 -> logits [B, 10]

The whitening kernel is computed from data (`whitening_kernel`) and frozen; BatchNorm has no
scale (only a trained bias), momentum 0.6 and eps 1e-12; convs have no bias and are
identity-("dirac"-)initialised on the first min(in, out) output channels, as in airbench.

The CNN gives its own features for the visual prefix (`FEATURE_SOURCES`): "pooled" (the head's input),
"spatial" (the last block's map) or "pyramid" (the stem and every block, each max-pooled to the last grid).

Convolutions run through `imgllm.vision.conv.conv2d`, whose `conv_impl` switch picks the plain `lax.conv` path
(GPU/TPU) or a CPU fast path. Max-pooling is a reshape + max, which XLA fuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from imgllm.precision import compute_dtype
from imgllm.vision.conv import check_conv_impl, conv2d
from imgllm.vision.conv_cpu import im2col_patches

FEATURE_SOURCES = ("pooled", "spatial", "pyramid")
# PyTorch's default Conv2d / Linear weight init: uniform, bound 1/sqrt(fan_in).
TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def max_pool(x: jax.Array, window: int) -> jax.Array:
    """Non-overlapping max-pool of x [B,H,W,C] (stride = window, floor mode like torch MaxPool2d).

    Written as crop + reshape + max, which XLA fuses into one loop (faster than reduce_window,
    whose CPU backward is a slow select-and-scatter).
    """
    batch, height, width, channels = x.shape
    out_h, out_w = height // window, width // window
    x = x[:, : out_h * window, : out_w * window, :]
    x = x.reshape(batch, out_h, window, out_w, window, channels)
    return jnp.max(x, axis=(2, 4))


def dirac_init(base_init=TORCH_DEFAULT_INIT):
    """Kernel init: base init, then identity on the first min(in, out) output channels.

    This is airbench's "implicit residual": at init the conv passes its input through.
    The base init is PyTorch's default Conv2d init.
    """

    def init(key, shape, dtype=jnp.float32):
        kernel_h, kernel_w, in_channels, out_channels = shape
        n = min(in_channels, out_channels)
        identity = np.zeros(shape, np.float32)  # built with numpy: a constant, cheap to compile
        identity[kernel_h // 2, kernel_w // 2, np.arange(n), np.arange(n)] = 1
        is_identity_channel = np.arange(out_channels) < n
        return jnp.where(is_identity_channel, identity.astype(dtype), base_init(key, shape, dtype))

    return init


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class Conv(nn.Module):
    """Bias-free stride-1 conv with an HWIO 'kernel' param; compute in `dtype`."""

    features: int
    kernel_size: int = 3
    padding: str = "SAME"
    conv_impl: str = "auto"
    dtype: Any = jnp.float32
    kernel_init: Any = dataclasses.field(default_factory=dirac_init)

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", self.kernel_init, (self.kernel_size, self.kernel_size, x.shape[-1], self.features), jnp.float32
        )
        return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), padding=self.padding, impl=self.conv_impl)


class ConvBlock(nn.Module):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU (airbench's ConvGroup)."""

    features: int
    conv_impl: str = "auto"
    bn_momentum: float = 0.6
    bn_eps: float = 1e-12
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda name: nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_eps,
            use_scale=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name=name,
        )
        conv = lambda name: Conv(self.features, conv_impl=self.conv_impl, dtype=self.dtype, name=name)
        x = max_pool(conv("conv1")(x), 2)
        x = nn.gelu(norm("norm1")(x), approximate=False)
        x = conv("conv2")(x)
        return nn.gelu(norm("norm2")(x), approximate=False)


class CNN(nn.Module):
    """airbench94-style CIFAR-10 classifier; returns (logits float32 [B,K], features [B,F]).

    The features are the head's input [B, widths[-1]] by default, or those `feature_source` names
    (see `features_from_stages`). Variables: {"params", "batch_stats"}. Call with train=True and
    mutable=["batch_stats"] to normalise with batch statistics and update the running ones.
    """

    num_classes: int = 10
    widths: Sequence[int] = (64, 256, 256)
    whiten_kernel: int = 2  # patch size of the whitening stem
    whiten_width: int = 24  # 2 * 3 * whiten_kernel**2: ± each eigenvector of the patch covariance
    freeze_whitening: bool = True  # the stem kernel is set from data and never trained
    bn_momentum: float = 0.6  # running = momentum * running + (1 - momentum) * batch
    bn_eps: float = 1e-12
    head_scale: float = 1 / 9  # logits = features @ head * head_scale
    conv_impl: str = "auto"  # "auto" | "hybrid" | "im2col" | "xla" (imgllm.vision.conv)
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(self, x, train: bool, feature_source: str = "pooled"):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"CNN expects normalised images [B,H,W,3], got shape {x.shape}")
        if feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source={feature_source!r}: expected one of {FEATURE_SOURCES}")
        whiten = self.param(
            "whiten_kernel",
            TORCH_DEFAULT_INIT,
            (self.whiten_kernel, self.whiten_kernel, 3, self.whiten_width),
            jnp.float32,
        )
        whiten_bias = self.param("whiten_bias", nn.initializers.zeros, (self.whiten_width,), jnp.float32)
        if self.freeze_whitening:
            whiten = lax.stop_gradient(whiten)
        stem = conv2d(x.astype(self.dtype), whiten.astype(self.dtype), padding="VALID", impl=self.conv_impl)
        # The stages' outputs, [stem, block1, ..., blockN], are what the feature sources read.
        stages = [nn.gelu(stem + whiten_bias.astype(self.dtype), approximate=False)]
        for i, width in enumerate(self.widths):
            block = ConvBlock(
                width,
                conv_impl=self.conv_impl,
                bn_momentum=self.bn_momentum,
                bn_eps=self.bn_eps,
                dtype=self.dtype,
                name=f"block{i + 1}",
            )
            stages.append(block(stages[-1], train))
        head = nn.Dense(
            self.num_classes,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=TORCH_DEFAULT_INIT,
            name="head",
        )
        pooled = features_from_stages(stages, "pooled")
        logits = (head(pooled) * self.head_scale).astype(jnp.float32)
        return logits, pooled if feature_source == "pooled" else features_from_stages(stages, feature_source)

    def features(self, x, train: bool, source: str = "pooled") -> jax.Array:
        """Features [B, F] of normalised images x, as `source` ("pooled", "spatial" or "pyramid") names them.

        Call as `cnn.apply(variables, x, train=False, source="pyramid", method=CNN.features)`.
        """
        return self(x, train, feature_source=source)[1]


def features_from_stages(stages: Sequence[jax.Array], source: str) -> jax.Array:
    """Features [B, F] from the CNN's stage outputs [stem, block1, ..., blockN] (each [B, h, w, c]).

    "pooled": the last block's global max [B, widths[-1]] (the head's input); "spatial": the last block's map
    flattened, F = h * w * widths[-1]; "pyramid": every stage max-pooled to the last block's grid and flattened,
    stem first, F = h * w * (whiten_width + sum(widths)).
    """
    last = stages[-1]
    if source == "pooled":
        return jnp.max(last, axis=(1, 2))
    if source not in FEATURE_SOURCES:
        raise ValueError(f"feature_source={source!r}: expected one of {FEATURE_SOURCES}")
    maps = stages if source == "pyramid" else [last]
    grid = last.shape[1:3]
    return jnp.concatenate([max_pool_to_grid(m, grid).reshape(m.shape[0], -1) for m in maps], axis=-1)


def max_pool_to_grid(feature_map: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Max-pools [B, H, W, C] to [B, gh, gw, C] over equal windows (H // gh, W // gw), dropping the remainder."""
    batch, height, width, channels = feature_map.shape
    wh, ww = height // grid[0], width // grid[1]
    cropped = feature_map[:, : wh * grid[0], : ww * grid[1]]
    return cropped.reshape(batch, grid[0], wh, grid[1], ww, channels).max(axis=(2, 4))


# ----------------------------------------------------------------------------------------------
# Presets and config
# ----------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "airbench94": dict(widths=(64, 256, 256)),  # 1,971,640 params with a 10-class head
    "tiny": dict(widths=(8, 16, 16)),  # for tests: compiles and runs in well under a second
}


def cnn_preset(name: str, **overrides) -> CNN:
    """CNN for a preset name ("airbench94" or "tiny"), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown CNN preset {name!r}; known: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(CNN)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"CNN preset {name!r}: unknown field(s) {unknown}; known: {sorted(fields)}")
    if isinstance(overrides.get("dtype"), str):  # a config's name: "auto", "float32" or "bfloat16"
        overrides["dtype"] = compute_dtype(overrides["dtype"])
    if "widths" in overrides:
        overrides["widths"] = tuple(int(w) for w in overrides["widths"])
    for field in ("num_classes", "widths"):
        values = overrides.get(field, ())
        if any(int(v) != v or v < 1 for v in (values if isinstance(values, tuple) else (values,))):
            raise ValueError(f"CNN preset {name!r}: {field}={values!r} must be a positive integer (widths: each one)")
    check_conv_impl(overrides.get("conv_impl", "auto"))  # validates the name early
    return CNN(**{**PRESETS[name], **overrides})


def cnn_from_config(cfg) -> CNN:
    """CNN from a model ConfigDict (or dict): `preset` names the preset, other keys override fields.

    Example: ConfigDict(dict(preset="airbench94", num_classes=10, conv_impl="auto", dtype="bfloat16")); a dtype
    name is resolved by `imgllm.precision.compute_dtype` ("auto": bfloat16 on GPU/TPU, float32 on CPU).
    """
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    if "preset" not in cfg:
        raise ValueError(f"CNN config needs a 'preset' key (one of {sorted(PRESETS)}); got keys {sorted(cfg)}")
    return cnn_preset(cfg.pop("preset"), **cfg)


# ----------------------------------------------------------------------------------------------
# Whitening stem from data
# ----------------------------------------------------------------------------------------------


def patch_covariance(images: np.ndarray, patch_size: int = 2, chunk: int = 512) -> np.ndarray:
    """Uncentred covariance E[p p^T] of all patch_size x patch_size patches of images [N,H,W,C].

    Patches are flattened (kh, kw, C), matching an HWIO kernel. Accumulated in float64 by chunks
    so that memory stays bounded for thousands of images.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"whitening: expected images [N,H,W,C], got shape {images.shape}")
    dim = patch_size * patch_size * images.shape[-1]
    total, count = np.zeros((dim, dim)), 0
    for start in range(0, len(images), chunk):
        block = np.asarray(
            im2col_patches(jnp.asarray(images[start : start + chunk], jnp.float32), patch_size, "VALID"), np.float64
        ).reshape(-1, dim)
        total += block.T @ block
        count += len(block)
    return total / count


def whitening_kernel(images_normalised: np.ndarray, patch_size: int = 2, eps: float = 5e-4) -> np.ndarray:
    """Whitening stem kernel [p,p,C,2*p*p*C] float32 from normalised images [N,H,W,C] (airbench).

    Each eigenvector v of the patch covariance, scaled by 1/sqrt(eigenvalue + eps), gives a filter;
    the kernel holds them (largest eigenvalue first) and then their negatives, so that after GELU
    both signs survive. Whitened patches have covariance ~ identity. airbench uses 5000 images.
    """
    covariance = patch_covariance(images_normalised, patch_size)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    filters = eigenvectors / np.sqrt(eigenvalues + eps)  # [dim, dim], column k = filter k
    filters = np.concatenate([filters, -filters], axis=1)
    channels = np.asarray(images_normalised).shape[-1]
    return filters.reshape(patch_size, patch_size, channels, -1).astype(np.float32)


def set_whitening(params, kernel: np.ndarray):
    """Returns params with the stem kernel replaced by `kernel` (e.g. from `whitening_kernel`)."""
    expected = params["whiten_kernel"].shape
    if tuple(kernel.shape) != tuple(expected):
        raise ValueError(f"whitening kernel has shape {tuple(kernel.shape)}, the model expects {tuple(expected)}")
    return {**params, "whiten_kernel": jnp.asarray(kernel, params["whiten_kernel"].dtype)}
