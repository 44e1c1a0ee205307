"""The image classifier: an airbench94-style CIFAR-10 CNN in pure flax.linen.

Architecture (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498):

    x [B,32,32,3] normalised
    └─ whitening conv 2x2 VALID, 3 -> 24 (= ± the 12 eigenvectors of the 2x2 patch covariance), + bias, GELU
       └─ 3 conv blocks, widths (64, 256, 256), each:
            conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU
          └─ global max-pool -> features [B, 256]
             └─ linear head (no bias) x 1/9 -> logits [B, 10]

The whitening kernel is computed from data (`whitening_kernel`) and frozen; BatchNorm has no
scale (only a trained bias), momentum 0.6 and eps 1e-12; convs have no bias and are
identity-("dirac"-)initialised on the first min(in, out) output channels, as in airbench.

Speed. On CPU, XLA hands a forward convolution to YNNPACK, 1.5-2x faster than im2col (the k*k shifted
views of the padded input concatenated on the channel axis, times the reshaped kernel in one matmul); the
input gradient is such a convolution too. The kernel gradient is not: XLA:CPU runs it 2-3x slower than
im2col's matmul. So `conv_impl="hybrid"` (`hybrid_conv`) takes lax.conv forward and for the input gradient,
im2col for the kernel gradient, and im2col throughout for the RGB stem, where lax.conv is slow. On GPU/TPU
the native `lax.conv` is fastest everywhere; `conv_impl="auto"` picks by platform, and all give the same
numbers up to float32 rounding. Max-pooling is a reshape + max, which XLA fuses.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ("auto", "hybrid", "im2col", "xla")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------------
# Functional building blocks
# ----------------------------------------------------------------------------------------------


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
    """Returns "hybrid", "im2col" or "xla" for `conv_impl`; "auto" means hybrid on CPU, xla elsewhere."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r}: expected one of {CONV_IMPLS}")
    if conv_impl != "auto":
        return conv_impl
    backend = backend or jax.default_backend()
    return "hybrid" if backend == "cpu" else "xla"


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """(low, high) padding that keeps the spatial size for stride 1, as lax's "SAME" does."""
    total = kernel_size - 1
    return total // 2, total - total // 2


def im2col_patches(x: jax.Array, kernel_size: int, padding: str) -> jax.Array:
    """Stacks the kernel_size**2 shifted views of x [B,H,W,C] on the channel axis.

    Returns [B, H', W', kh*kw*C] ordered (kh, kw, C), the order of an HWIO kernel reshaped to
    [kh*kw*C, O], so that `patches @ kernel.reshape(-1, O)` is the stride-1 convolution.
    """
    _check_padding(padding)
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), *_padding_pairs(kernel_size, padding), (0, 0)))
    out_h = x.shape[1] - kernel_size + 1
    out_w = x.shape[2] - kernel_size + 1
    views = [x[:, i:i + out_h, j:j + out_w, :] for i in range(kernel_size) for j in range(kernel_size)]
    return jnp.concatenate(views, axis=-1)


def conv2d(x: jax.Array, kernel: jax.Array, *, padding: str = "SAME", impl: str = "auto") -> jax.Array:
    """Stride-1 2-D convolution of x [B,H,W,C] with an HWIO kernel [k,k,C,O], no bias.

    impl "hybrid" is `lax.conv` forward and for the input gradient, im2col for the kernel gradient
    (`hybrid_conv`, the fastest on CPU), or im2col throughout for fewer than HYBRID_MIN_IN_CHANNELS
    input channels, where XLA:CPU's convolution is slow (3-4x slower than im2col for the RGB stem);
    "im2col" is one matmul over `im2col_patches`, forward and backward; "xla" is
    `lax.conv_general_dilated` with its own gradients (fast on GPU/TPU); "auto" picks by platform.
    """
    impl = resolve_conv_impl(impl)
    kernel_size, _, in_channels, _ = kernel.shape
    if x.shape[-1] != in_channels:
        raise ValueError(f"conv2d: input has {x.shape[-1]} channels, kernel expects {in_channels}")
    _check_padding(padding)
    if impl == "xla":
        return native_conv(x, kernel, padding)
    if impl == "hybrid" and in_channels >= HYBRID_MIN_IN_CHANNELS:
        return hybrid_conv(x, kernel, padding)
    return im2col_conv(x, _kernel_matrix(kernel), kernel_size, padding)


# Below this many input channels "hybrid" uses im2col: measured here, the 2x2 stem on RGB (3 channels) runs 3-4x
# faster as im2col, the 3x3 conv on the stem's 24 channels 1.5x slower.
HYBRID_MIN_IN_CHANNELS = 16


def native_conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """`lax.conv_general_dilated`, stride 1, NHWC input, HWIO kernel; padding "SAME", "VALID" or pairs."""
    return lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _check_padding(padding: str) -> None:
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding={padding!r}: expected 'SAME' or 'VALID'")


def _padding_pairs(kernel_size: int, padding: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit (low, high) padding of both spatial axes for "SAME" or "VALID"."""
    pair = _same_padding(kernel_size) if padding == "SAME" else (0, 0)
    return pair, pair


def _kernel_matrix(kernel: jax.Array) -> jax.Array:
    """An HWIO kernel [k,k,C,O] as the [k*k*C, O] matrix that multiplies `im2col_patches`."""
    return kernel.reshape(-1, kernel.shape[-1])


# Largest im2col patch tensor built at once; bigger convolutions run over strided chunks of the batch.
PATCH_CHUNK_BYTES = 256 * 2**20


def _batch_chunks(x: jax.Array, kernel_size: int, padding: str) -> int:
    """How many chunks of the batch keep each chunk's patches under PATCH_CHUNK_BYTES (a divisor of the batch)."""
    batch, height, width, channels = x.shape
    if padding == "VALID":
        height, width = height - kernel_size + 1, width - kernel_size + 1
    patch_bytes = batch * height * width * kernel_size * kernel_size * channels * x.dtype.itemsize
    wanted = -(-patch_bytes // PATCH_CHUNK_BYTES)
    return next(n for n in range(min(wanted, batch), batch + 1) if batch % n == 0)


def _over_chunks(arrays, chunks: int):
    """[B, ...] arrays -> [chunks, B/chunks, ...]: chunk c holds rows c, c + chunks, ... (strided, so that a
    batch sharded over devices in contiguous blocks keeps every chunk split the same way)."""
    return [a.reshape(a.shape[0] // chunks, chunks, *a.shape[1:]).swapaxes(0, 1) for a in arrays]


def _from_chunks(a: jax.Array) -> jax.Array:
    """Inverse of `_over_chunks` for one array."""
    return a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def im2col_conv(x: jax.Array, kernel_matrix: jax.Array, kernel_size: int, padding: str) -> jax.Array:
    """`im2col_patches(x) @ kernel_matrix` [k*k*C, O], with a gradient that keeps only x.

    Autodiff would save the patches (k*k times the input: 2.9 GB of a 1024-image airbench94 step);
    `_im2col_conv_bwd` rebuilds them from x instead, which costs a few copies and no matmul. Patches larger
    than PATCH_CHUNK_BYTES are built and multiplied one chunk of the batch at a time (`lax.map`), forward and
    backward, which bounds the step's peak memory at little cost: each chunk's matmul is still large.
    """
    chunks = _batch_chunks(x, kernel_size, padding)
    conv = lambda v: jnp.dot(im2col_patches(v, kernel_size, padding), kernel_matrix)
    if chunks == 1:
        return conv(x)
    return _from_chunks(lax.map(conv, *_over_chunks([x], chunks)))


def _im2col_conv_fwd(x, kernel_matrix, kernel_size, padding):
    return im2col_conv(x, kernel_matrix, kernel_size, padding), (x, kernel_matrix)


def _im2col_gradients(x, grad_out, kernel_matrix, kernel_size: int, padding: str, with_input_gradient: bool):
    """(grad_x or None, grad_kernel) of `im2col_patches(x) @ kernel_matrix`, as plain matmuls per chunk.

    The input gradient folds `grad_out @ kernel_matrix.T` back by im2col's transpose. grad_out goes behind
    an optimisation barrier: otherwise XLA:CPU fuses its producer (max-pool or BatchNorm backward) into
    the transpose that the weight-gradient matmul needs, and that fused transpose alone took 15% of a
    training step; materialised first, it is a fast copy.
    """
    x, grad_out = lax.optimization_barrier((x, grad_out))   # also stops CSE with the forward patches

    def chunk_gradients(grad_kernel, x_and_grad):
        x_chunk, grad_chunk = x_and_grad
        patches, patches_transpose = jax.vjp(lambda v: im2col_patches(v, kernel_size, padding), x_chunk)
        flat_patches = patches.reshape(-1, patches.shape[-1])
        grad_kernel = grad_kernel + jnp.dot(flat_patches.T, grad_chunk.reshape(-1, grad_chunk.shape[-1]))
        if not with_input_gradient:
            return grad_kernel, None
        grad_x, = patches_transpose(jnp.dot(grad_chunk, kernel_matrix.T))
        return grad_kernel, grad_x

    zeros = jnp.zeros(kernel_matrix.shape, jnp.result_type(x, kernel_matrix))
    chunks = _batch_chunks(x, kernel_size, padding)
    if chunks == 1:
        grad_kernel, grad_x = chunk_gradients(zeros, (x, grad_out))
    else:
        grad_kernel, grad_x = lax.scan(chunk_gradients, zeros, _over_chunks([x, grad_out], chunks))
        grad_x = None if grad_x is None else _from_chunks(grad_x)
    return grad_x, grad_kernel.astype(kernel_matrix.dtype)


def _im2col_conv_bwd(kernel_size, padding, residuals, grad_out):
    x, kernel_matrix = residuals
    return _im2col_gradients(x, grad_out, kernel_matrix, kernel_size, padding, with_input_gradient=True)


im2col_conv.defvjp(_im2col_conv_fwd, _im2col_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def hybrid_conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """`native_conv(x, kernel [k,k,C,O], padding)`, whose gradients each take the faster of two routes on CPU.

    XLA:CPU hands a forward convolution to YNNPACK, which runs it 1.5-2x faster than im2col (it never
    builds the patches); the input gradient is again such a convolution (`_input_gradient`). The kernel
    gradient is not: as a convolution it runs 2-3x slower than im2col, so it is im2col's matmul.
    """
    return native_conv(x, kernel, padding)


def _input_gradient(grad_out: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """d(native_conv)/dx applied to grad_out: a convolution of grad_out with the spatially flipped,
    in/out-swapped kernel, padded by kernel_size - 1 - the forward padding on each side."""
    kernel_size = kernel.shape[0]
    pairs = tuple((kernel_size - 1 - low, kernel_size - 1 - high)
                  for low, high in _padding_pairs(kernel_size, padding))
    return native_conv(grad_out, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), pairs)


def _hybrid_conv_fwd(x, kernel, padding):
    return hybrid_conv(x, kernel, padding), (x, kernel)


def _hybrid_conv_bwd(padding, residuals, grad_out):
    x, kernel = residuals
    _, grad_kernel = _im2col_gradients(x, grad_out, _kernel_matrix(kernel), kernel.shape[0], padding,
                                       with_input_gradient=False)
    return _input_gradient(grad_out, kernel, padding), grad_kernel.reshape(kernel.shape)


hybrid_conv.defvjp(_hybrid_conv_fwd, _hybrid_conv_bwd)


def max_pool(x: jax.Array, window: int) -> jax.Array:
    """Non-overlapping max-pool of x [B,H,W,C] (stride = window, floor mode like torch MaxPool2d).

    Written as crop + reshape + max, which XLA fuses into one loop (faster than reduce_window,
    whose CPU backward is a slow select-and-scatter).
    """
    batch, height, width, channels = x.shape
    out_h, out_w = height // window, width // window
    x = x[:, :out_h * window, :out_w * window, :]
    x = x.reshape(batch, out_h, window, out_w, window, channels)
    return jnp.max(x, axis=(2, 4))


def dirac_init(base_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")):
    """Kernel init: base init, then identity on the first min(in, out) output channels.

    This is airbench's "implicit residual": at init the conv passes its input through.
    The base init (uniform, bound 1/sqrt(fan_in)) is PyTorch's default Conv2d init.
    """

    def init(key, shape, dtype=jnp.float32):
        kernel_h, kernel_w, in_channels, out_channels = shape
        n = min(in_channels, out_channels)
        identity = np.zeros(shape, np.float32)      # built with numpy: a constant, cheap to compile
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
        kernel = self.param("kernel", self.kernel_init,
                            (self.kernel_size, self.kernel_size, x.shape[-1], self.features), jnp.float32)
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
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
            use_scale=False, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        conv = lambda name: Conv(self.features, conv_impl=self.conv_impl, dtype=self.dtype, name=name)
        x = max_pool(conv("conv1")(x), 2)
        x = nn.gelu(norm("norm1")(x), approximate=False)
        x = conv("conv2")(x)
        return nn.gelu(norm("norm2")(x), approximate=False)


class CNN(nn.Module):
    """airbench94-style CIFAR-10 classifier; returns (logits float32 [B,K], features [B,widths[-1]]).

    Variables: {"params", "batch_stats"}. Call with train=True and mutable=["batch_stats"] to
    normalise with batch statistics and update the running ones.
    """

    num_classes: int = 10
    widths: Sequence[int] = (64, 256, 256)
    whiten_kernel: int = 2          # patch size of the whitening stem
    whiten_width: int = 24          # 2 * 3 * whiten_kernel**2: ± each eigenvector of the patch covariance
    freeze_whitening: bool = True   # the stem kernel is set from data and never trained
    bn_momentum: float = 0.6        # running = momentum * running + (1 - momentum) * batch
    bn_eps: float = 1e-12
    head_scale: float = 1 / 9       # logits = features @ head * head_scale
    conv_impl: str = "auto"         # "auto" | "im2col" | "xla"
    dtype: Any = jnp.float32        # compute dtype; params stay float32

    @nn.compact
    def __call__(self, x, train: bool):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"CNN expects normalised images [B,H,W,3], got shape {x.shape}")
        whiten = self.param("whiten_kernel", nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                            (self.whiten_kernel, self.whiten_kernel, 3, self.whiten_width), jnp.float32)
        whiten_bias = self.param("whiten_bias", nn.initializers.zeros, (self.whiten_width,), jnp.float32)
        if self.freeze_whitening:
            whiten = lax.stop_gradient(whiten)
        x = conv2d(x.astype(self.dtype), whiten.astype(self.dtype), padding="VALID", impl=self.conv_impl)
        x = nn.gelu(x + whiten_bias.astype(self.dtype), approximate=False)
        for i, width in enumerate(self.widths):
            x = ConvBlock(width, conv_impl=self.conv_impl, bn_momentum=self.bn_momentum,
                          bn_eps=self.bn_eps, dtype=self.dtype, name=f"block{i + 1}")(x, train)
        features = jnp.max(x, axis=(1, 2))
        head = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), name="head")
        logits = head(features) * self.head_scale
        return logits.astype(jnp.float32), features


# ----------------------------------------------------------------------------------------------
# Presets and config
# ----------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "airbench94": dict(widths=(64, 256, 256)),   # 1,971,640 params with a 10-class head
    "tiny": dict(widths=(8, 16, 16)),            # for tests: compiles and runs in well under a second
}


def cnn_preset(name: str, **overrides) -> CNN:
    """CNN for a preset name ("airbench94" or "tiny"), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown CNN preset {name!r}; known: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(CNN)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"CNN preset {name!r}: unknown field(s) {unknown}; known: {sorted(fields)}")
    if isinstance(overrides.get("dtype"), str):
        if overrides["dtype"] not in DTYPES:
            raise ValueError(f"CNN dtype={overrides['dtype']!r}: expected one of {sorted(DTYPES)}")
        overrides["dtype"] = DTYPES[overrides["dtype"]]
    if "widths" in overrides:
        overrides["widths"] = tuple(int(w) for w in overrides["widths"])
    resolve_conv_impl(overrides.get("conv_impl", "auto"))  # validates the name early
    return CNN(**{**PRESETS[name], **overrides})


def cnn_from_config(cfg) -> CNN:
    """CNN from a model ConfigDict (or dict): `preset` names the preset, other keys override fields.

    Example: ConfigDict(dict(preset="airbench94", num_classes=10, conv_impl="auto", dtype="float32")).
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
        block = np.asarray(im2col_patches(jnp.asarray(images[start:start + chunk], jnp.float32),
                                          patch_size, "VALID"), np.float64).reshape(-1, dim)
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
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)          # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    filters = eigenvectors / np.sqrt(eigenvalues + eps)              # [dim, dim], column k = filter k
    filters = np.concatenate([filters, -filters], axis=1)
    channels = np.asarray(images_normalised).shape[-1]
    return filters.reshape(patch_size, patch_size, channels, -1).astype(np.float32)


def set_whitening(params, kernel: np.ndarray):
    """Returns params with the stem kernel replaced by `kernel` (e.g. from `whitening_kernel`)."""
    expected = params["whiten_kernel"].shape
    if tuple(kernel.shape) != tuple(expected):
        raise ValueError(f"whitening kernel has shape {tuple(kernel.shape)}, the model expects {tuple(expected)}")
    return {**params, "whiten_kernel": jnp.asarray(kernel, params["whiten_kernel"].dtype)}


def param_groups(params) -> Any:
    """Labels each param for optax.multi_transform, following airbench's optimiser groups.

    "frozen": the whitening kernel (when frozen); "whiten_bias": trained only the first epochs;
    "norm_bias": BatchNorm biases (airbench: lr x 64, no extra weight decay scaling);
    "weight": everything else.
    """

    def label(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] == "whiten_kernel":
            return "frozen"
        if names[-1] == "whiten_bias":
            return "whiten_bias"
        if any(n.startswith("norm") for n in names):
            return "norm_bias"
        return "weight"

    return jax.tree_util.tree_map_with_path(label, params)
