"""XLA:CPU's fast path for the LMs' matmuls: kernels stored [out, in], multiplied kernel-first for few rows.

The plain path is `imgllm.language.gpt2`'s ordinary ``[in, out]`` ``nn.Dense`` layers: the layout checkpoints
hold, and what GPU/TPU run. On XLA:CPU, the dot reads a large kernel faster in the ``[out, in]`` layout, and for a
few rows faster still as the left operand (``kernel · xᵀ``, `times_out_in`).

The switch is the parameters themselves: `kernels_out_in` converts them once (on the host, after loading) into
`OutInParams`, and `imgllm.language.model.model_and_params` builds the model that reads them
(``config.module(kernel_out_in=True)``, whose layers are `OutInDense`). Unconverted parameters run the plain path.
Nothing
here asks for the backend: whoever converts decides (``imgllm.pipeline.caption.inference_params`` does it on CPU).
Tests hold the converted model to the plain one (same logits within float tolerance, same greedy tokens);
benchmarks/README.md holds the measured gains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp

# Row counts for which XLA:CPU multiplies faster with the kernel as the left operand (`times_out_in`).
KERNEL_FIRST_ROWS = (2, 64)


@flax.struct.dataclass
class OutInParams:
    """LM parameters whose kernels are stored [out, in]: what `kernels_out_in` returns.

    Generation and scoring accept them wherever they accept the parameters (`model.model_and_params`). Make them
    once per set of weights (after loading, not per call): the transpose reads every kernel once.
    """

    params: Any


def kernels_out_in(params: Mapping[str, Any]) -> OutInParams:
    """The parameters with every block kernel transposed to [out, in], the layout XLA:CPU's matmuls read fastest.
    Works on arrays and on ShapeDtypeStructs (through ``jax.eval_shape``); converted parameters are returned as
    they are."""
    if isinstance(params, OutInParams):
        return params
    flat = flax.traverse_util.flatten_dict(dict(params))
    return OutInParams(
        flax.traverse_util.unflatten_dict(
            {path: value.T if path[-1] == "kernel" else value for path, value in flat.items()}
        )
    )


def few_rows_times_out_in(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] times the transpose of kernel [out, in], computed as kernel · xᵀ [out, rows], then transposed.

    The same product as contracting both last axes, but XLA:CPU's dot reads a large [out, in] kernel faster when
    it is the left operand and the few rows the right one (for 2 to 64 rows, `KERNEL_FIRST_ROWS`; equal at one
    row, slower from about 128). The optimisation barrier keeps XLA's simplifier from folding the transpose back
    into the dot, which would undo the swap; the transpose itself is of a small array.
    """
    rows = math.prod(x.shape[:-1])
    kernel_first = jax.lax.dot_general(kernel, x.reshape(rows, x.shape[-1]), (((1,), (1,)), ((), ())))
    return jax.lax.optimization_barrier(kernel_first).T.reshape(*x.shape[:-1], kernel.shape[0])


def times_out_in(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] times the transpose of kernel [out, in]: kernel-first (`few_rows_times_out_in`) for a row count
    in `KERNEL_FIRST_ROWS`, else one dot contracting both last axes. The row count is static: chosen at trace
    time from shapes alone."""
    rows = math.prod(x.shape[:-1])
    if KERNEL_FIRST_ROWS[0] <= rows <= KERNEL_FIRST_ROWS[1]:
        return few_rows_times_out_in(x, kernel)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ())))


class OutInDense(nn.Module):
    """``nn.Dense`` with its kernel stored [out, in] (`kernels_out_in`): y = x @ kernel.T + bias, by
    `times_out_in`. Parameters in float32, computation in ``dtype``, as the plain ``nn.Dense`` it replaces."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (self.features, x.shape[-1]), jnp.float32)
        y = times_out_in(x.astype(self.dtype), kernel.astype(self.dtype))
        if not self.use_bias:
            return y
        return y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
