"""The CNN's convolution: one switch, `conv_impl`, between the plain `lax.conv` path and the CPU fast paths.

    conv2d(x, kernel, padding=..., impl=...)    stride 1, NHWC input, HWIO kernel, no bias
      impl "xla"     `lax_conv` below: the plain path, XLA's own convolution and gradients (fast on GPU/TPU)
      impl "hybrid"  lax.conv forward and input gradient, im2col kernel gradient (`conv_cpu.hybrid_conv`)
      impl "im2col"  one matmul over the patches, forward and backward (`conv_cpu.im2col_conv`)
      impl "auto"    "hybrid" on CPU, "xla" elsewhere (`AUTO_IMPLS`), chosen for the platform the program is
                     lowered for, not the host that traces it

"auto" is `lax.platform_dependent`: both paths are traced, and lowering keeps the one of its platform, so one jitted
function runs "hybrid" on CPU and "xla" on GPU/TPU, and a program exported from a CPU host for
("cuda", "tpu") holds no CPU path (tests/test_lowering.py). Differentiation and vmap go through it (it is a
`lax.switch` until lowering), and the CPU paths keep their custom gradients.

Why the switch: XLA:CPU computes a convolution's kernel gradient slowly, and im2col makes it one matmul.
All impls give the same numbers up to float32 rounding; tests/test_cnn.py checks the fast paths against
`lax_conv`, forward and gradients.
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from imgllm.vision import conv_cpu

CONV_IMPLS = ("auto", "hybrid", "im2col", "xla")
# What "auto" runs per platform (`lax.platform_dependent`'s names: "cpu", "cuda", "rocm", "tpu"); others run "xla".
AUTO_IMPLS = {"cpu": "hybrid"}


def check_conv_impl(conv_impl: str) -> None:
    """Raises ValueError unless `conv_impl` is one of CONV_IMPLS."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r}: expected one of {CONV_IMPLS}")


def resolve_conv_impl(conv_impl: str, backend: str) -> str:
    """What `conv_impl` runs on `backend` ("cpu", "gpu", "cuda", "rocm", "tpu"): "hybrid", "im2col" or "xla".

    "auto" is "hybrid" on "cpu" and "xla" elsewhere. `conv2d` does not call this: it chooses when the program is
    lowered, for each platform it is lowered for; this is the same table for a platform named on the host.
    """
    check_conv_impl(conv_impl)
    if conv_impl != "auto":
        return conv_impl
    return AUTO_IMPLS.get(backend, "xla")


def conv2d(x: jax.Array, kernel: jax.Array, *, padding: str = "SAME", impl: str = "auto") -> jax.Array:
    """Stride-1 2-D convolution of x [B,H,W,C] with an HWIO kernel [k,k,C,O], no bias, by `impl` (see above)."""
    check_conv_impl(impl)
    in_channels = kernel.shape[2]
    if x.shape[-1] != in_channels:
        raise ValueError(f"conv2d: input has {x.shape[-1]} channels, kernel expects {in_channels}")
    conv_cpu.check_padding(padding)
    if impl != "auto":
        return _conv(x, kernel, padding, impl)
    # The path is chosen when the program is lowered, per platform; until then both are traced.
    per_platform = {platform: functools.partial(_conv, padding=padding, impl=i) for platform, i in AUTO_IMPLS.items()}
    return lax.platform_dependent(
        x, kernel, **per_platform, default=functools.partial(_conv, padding=padding, impl="xla")
    )


def _conv(x: jax.Array, kernel: jax.Array, padding: str, impl: str) -> jax.Array:
    """`conv2d` by a named impl: "xla", "hybrid" or "im2col"."""
    if impl == "xla":
        return lax_conv(x, kernel, padding)
    return conv_cpu.cpu_conv(x, kernel, padding, impl)


def lax_conv(x: jax.Array, kernel: jax.Array, padding: str) -> jax.Array:
    """The plain path: `lax.conv_general_dilated`, stride 1, NHWC input, HWIO kernel, padding "SAME" or "VALID"."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
