"""CPU fast paths of the stride-1 convolution: im2col and hybrid (lax.conv forward, im2col kernel gradient).

`imgllm.vision.conv.conv2d` picks these with conv_impl "hybrid" or "im2col" (the default "auto" means "hybrid" on
CPU); on GPU/TPU it runs the plain `lax.conv` path, which is also the oracle tests/test_cnn.py compares these with.

Why they exist: XLA:CPU's convolution kernel gradient is slow, im2col turns it into one large matmul; XLA:CPU's
convolution is also slow on few input channels (the RGB stem), where im2col is used throughout.

    cpu_conv(x, kernel, padding, impl)   the entry point: impl "hybrid" or "im2col"
    im2col_patches(x)       the k*k shifted views of x on the channel axis: [B, H', W', k*k*C]
    im2col_conv             patches @ kernel matrix, gradients as matmuls, patches rebuilt instead of saved
    hybrid_conv             lax.conv forward and input gradient, im2col kernel gradient
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Below this many input channels "hybrid" uses im2col: the 2x2 stem on RGB (3 channels) is faster as im2col, the
# 3x3 conv on the stem's 24 channels is faster as lax.conv.
HYBRID_MIN_IN_CHANNELS = 16

# Largest im2col patch tensor built at once; bigger convolutions run over strided chunks of the batch.
PATCH_CHUNK_BYTES = 256 * 2**20


def check_padding(padding: str) -> None:
    """Raises ValueError unless padding is "SAME" or "VALID" (the only ones these kernels implement)."""
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding={padding!r}: expected 'SAME' or 'VALID'")


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """(low, high) padding that keeps the spatial size for stride 1, as lax's "SAME" does."""
    total = kernel_size - 1
    return total // 2, total - total // 2


def padding_pairs(kernel_size: int, padding: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Explicit (low, high) padding of both spatial axes for "SAME" or "VALID"."""
    pair = _same_padding(kernel_size) if padding == "SAME" else (0, 0)
    return pair, pair


def cpu_conv(x: jax.Array, kernel: jax.Array, padding: str, impl: str) -> jax.Array:
    """The stride-1 convolution of x [B,H,W,C] with an HWIO kernel [k,k,C,O] by impl "hybrid" or "im2col".

    "hybrid" is `hybrid_conv`, or im2col for fewer than HYBRID_MIN_IN_CHANNELS input channels.
    """
    if impl not in ("hybrid", "im2col"):
        raise ValueError(f"cpu_conv: impl={impl!r}: expected 'hybrid' or 'im2col'")
    check_padding(padding)
    if impl == "hybrid" and kernel.shape[2] >= HYBRID_MIN_IN_CHANNELS:
        return hybrid_conv(x, kernel, padding)
    return im2col_conv(x, _kernel_matrix(kernel), kernel.shape[0], padding)


def _kernel_matrix(kernel: jax.Array) -> jax.Array:
    """An HWIO kernel [k,k,C,O] as the [k*k*C, O] matrix that multiplies `im2col_patches`."""
    return kernel.reshape(-1, kernel.shape[-1])


def im2col_patches(x: jax.Array, kernel_size: int, padding: str) -> jax.Array:
    """Stacks the kernel_size**2 shifted views of x [B,H,W,C] on the channel axis.

    Returns [B, H', W', kh*kw*C] ordered (kh, kw, C), the order of an HWIO kernel reshaped to
    [kh*kw*C, O], so that `patches @ kernel.reshape(-1, O)` is the stride-1 convolution.
    """
    check_padding(padding)
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), *padding_pairs(kernel_size, padding), (0, 0)))
    out_h = x.shape[1] - kernel_size + 1
    out_w = x.shape[2] - kernel_size + 1
    views = [x[:, i : i + out_h, j : j + out_w, :] for i in range(kernel_size) for j in range(kernel_size)]
    return jnp.concatenate(views, axis=-1)


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
    the transpose that the weight-gradient matmul needs, and that fused transpose is slow; materialised
    first, it is a fast copy.
    """
    x, grad_out = lax.optimization_barrier((x, grad_out))  # also stops CSE with the forward patches

    def chunk_gradients(grad_kernel, x_and_grad):
        x_chunk, grad_chunk = x_and_grad
        patches, patches_transpose = jax.vjp(lambda v: im2col_patches(v, kernel_size, padding), x_chunk)
        flat_patches = patches.reshape(-1, patches.shape[-1])
        grad_kernel = grad_kernel + jnp.dot(flat_patches.T, grad_chunk.reshape(-1, grad_chunk.shape[-1]))
        if not with_input_gradient:
            return grad_kernel, None
        (grad_x,) = patches_transpose(jnp.dot(grad_chunk, kernel_matrix.T))
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


def _lax_conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    """`lax.conv_general_dilated`, stride 1, NHWC input, HWIO kernel, padding "SAME", "VALID" or (low, high) pairs:
    the call of `imgllm.vision.conv.lax_conv`, which also takes the explicit pairs the input gradient needs."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def hybrid_conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """The plain `lax.conv` of x with kernel [k,k,C,O], whose gradients each take the faster of two routes on CPU.

    The forward and the input gradient (`_input_gradient`) are lax.conv: XLA:CPU hands them to YNNPACK, faster
    than im2col because the patches are never built. The kernel gradient is im2col's matmul: as a convolution
    it is slower on XLA:CPU.
    """
    return _lax_conv(x, kernel, padding)


def _input_gradient(grad_out: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """d(lax.conv)/dx applied to grad_out: a convolution of grad_out with the spatially flipped,
    in/out-swapped kernel, padded by kernel_size - 1 - the forward padding on each side."""
    kernel_size = kernel.shape[0]
    pairs = tuple((kernel_size - 1 - low, kernel_size - 1 - high) for low, high in padding_pairs(kernel_size, padding))
    return _lax_conv(grad_out, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), pairs)


def _hybrid_conv_fwd(x, kernel, padding):
    return hybrid_conv(x, kernel, padding), (x, kernel)


def _hybrid_conv_bwd(padding, residuals, grad_out):
    x, kernel = residuals
    _, grad_kernel = _im2col_gradients(
        x, grad_out, _kernel_matrix(kernel), kernel.shape[0], padding, with_input_gradient=False
    )
    return _input_gradient(grad_out, kernel, padding), grad_kernel.reshape(kernel.shape)


hybrid_conv.defvjp(_hybrid_conv_fwd, _hybrid_conv_bwd)
