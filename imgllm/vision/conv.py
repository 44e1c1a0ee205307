"""The CNN's convolution: one switch, `conv_impl`, between the plain `lax.conv` path and the CPU fast paths.

    conv2d(x, kernel, padding=..., impl=...)    stride 1, NHWC input, HWIO kernel, no bias
      impl "xla"     `lax_conv` below: the plain path, XLA's own convolution and gradients (fast on GPU/TPU)
      impl "hybrid"  lax.conv forward and input gradient, im2col kernel gradient (`conv_cpu.hybrid_conv`)
      impl "im2col"  one matmul over the patches, forward and backward (`conv_cpu.im2col_conv`)
      impl "auto"    "hybrid" on CPU, "xla" elsewhere

Why the switch: XLA:CPU computes a convolution's kernel gradient slowly, and im2col makes it one matmul.
All impls give the same numbers up to float32 rounding; tests/test_cnn.py checks the fast paths against
`lax_conv`, forward and gradients.
"""

from __future__ import annotations

import jax
from jax import lax

from imgllm.vision import conv_cpu

CONV_IMPLS = ("auto", "hybrid", "im2col", "xla")


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
    """Returns "hybrid", "im2col" or "xla" for `conv_impl`; "auto" means hybrid on CPU, xla elsewhere."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r}: expected one of {CONV_IMPLS}")
    if conv_impl != "auto":
        return conv_impl
    backend = backend or jax.default_backend()
    return "hybrid" if backend == "cpu" else "xla"


def conv2d(x: jax.Array, kernel: jax.Array, *, padding: str = "SAME", impl: str = "auto") -> jax.Array:
    """Stride-1 2-D convolution of x [B,H,W,C] with an HWIO kernel [k,k,C,O], no bias, by `impl` (see above)."""
    impl = resolve_conv_impl(impl)
    in_channels = kernel.shape[2]
    if x.shape[-1] != in_channels:
        raise ValueError(f"conv2d: input has {x.shape[-1]} channels, kernel expects {in_channels}")
    conv_cpu.check_padding(padding)
    if impl == "xla":
        return lax_conv(x, kernel, padding)
    return conv_cpu.cpu_conv(x, kernel, padding, impl)


def lax_conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """The plain path: `lax.conv_general_dilated`, stride 1, NHWC input, HWIO kernel, padding "SAME" or "VALID"."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
