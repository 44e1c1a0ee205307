"""Compute precision: one setting, "auto" | "float32" | "bfloat16", resolved once on the host.

    --config.dtype (train.py)   --dtype (infer.py)   CaptionOptions(dtype=)   PipelineCheckpoint.spec(dtype=)
      └─ resolve_dtype: "auto" is bfloat16 on GPU/TPU, float32 on CPU (XLA:CPU has no fast bfloat16 matmuls)
         └─ the CNN's and the LM's compute dtype (`CNN.dtype`, the LM config's `dtype`)

What the setting changes is only the dtype of activations and matmul inputs. Parameters, their gradients and the
optimizer state stay float32 (flax casts a float32 parameter to the compute dtype where it is used), and so do
the numbers that need the range or the resolution: BatchNorm statistics (computed in float32 and stored float32),
attention and output softmaxes, log-probabilities, losses, and the logits sampling and beam search read (the CNN
and the LM return float32 logits). In the LMs the attention scores and the output logits also accumulate in float32
(never rounded to bfloat16), and the residual stream between blocks is float32. The visual-prefix mapper
(`imgllm.bridge`) is one small MLP and stays float32.

Traced code never asks for the backend: the name is resolved here, before anything is built or compiled.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
# Backends on which "auto" computes in bfloat16: their matrix units are built for it.
BFLOAT16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")
# The dtype objects the models' fields hold (jnp.float32 is the default of `CNN.dtype` and of the LM configs' `dtype`):
# always these, so that equal configs also hash equal (a static jit argument, a cache key).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(name: str = "auto", backend: str | None = None) -> str:
    """The compute dtype "float32" or "bfloat16" that a setting names; "auto": bfloat16 on GPU/TPU, float32 on CPU.

    backend: the platform to resolve "auto" for (default: `jax.default_backend()`, asked here on the host).
    """
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype={name!r}: expected one of {DTYPE_CHOICES}")
    if name != "auto":
        return name
    backend = jax.default_backend() if backend is None else backend
    return "bfloat16" if backend in BFLOAT16_BACKENDS else "float32"


def compute_dtype(name: str = "auto", backend: str | None = None) -> Any:
    """The dtype a model field takes for a setting (`resolve_dtype`): jnp.float32 or jnp.bfloat16."""
    return COMPUTE_DTYPES[resolve_dtype(name, backend)]


def run_dtype(config: Mapping[str, Any]) -> str:
    """The resolved compute dtype of a training run: `resolve_dtype(config.dtype)`, for every model it builds.

    config.dtype is the one setting, and it wins: a legacy per-model key (below) that disagrees with it is ignored,
    with a warning naming it. Before config.dtype existed the CNN read config.model.dtype and the LM config.lm.dtype
    ("float32" unless set), so a config without a top-level "dtype" (a checkpoint's saved before it) computes as it
    did: in lm.dtype when set, else model.dtype, else float32.
    """
    resolved, ignored = _resolved_and_ignored(config)
    for key, value in ignored.items():
        warnings.warn(
            f"config.{key}={value!r} is ignored: config.dtype={config['dtype']!r} ({resolved} here) sets "
            "the compute dtype of every model",
            stacklevel=2,
        )
    return resolved


def _resolved_and_ignored(config: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """(`run_dtype`'s result, the legacy keys it ignores because they disagree with config.dtype)."""
    legacy = legacy_dtypes(config)
    if config.get("dtype") is None:
        return resolve_dtype(legacy.get("lm.dtype", legacy.get("model.dtype", "float32"))), {}
    resolved = resolve_dtype(config["dtype"])
    return resolved, {key: value for key, value in legacy.items() if value != resolved}


def legacy_dtypes(config: Mapping[str, Any]) -> dict[str, str]:
    """{"model.dtype": value, "lm.dtype": value} for the legacy per-model keys a config sets (not None)."""
    found = {}
    for section in ("model", "lm"):
        values = config.get(section)
        value = values.get("dtype") if hasattr(values, "get") else None
        if value is not None:
            found[f"{section}.dtype"] = str(value)
    return found


def comparable_dtype(config_json: Mapping[str, Any]) -> dict[str, Any]:
    """A saved or current config (JSON form) with its compute dtype in one comparable place, for resuming.

    The top-level "dtype" becomes the resolved `run_dtype` (so "auto" and the dtype it means on this backend
    compare equal, and a checkpoint saved before config.dtype existed compares as float32, or its legacy value),
    and the legacy model.dtype / lm.dtype keys are dropped (config.dtype replaces them).
    """
    raw = dict(config_json)
    dtype, _ = _resolved_and_ignored(raw)
    for section in ("model", "lm"):
        if isinstance(raw.get(section), Mapping):
            raw[section] = {key: value for key, value in raw[section].items() if key != "dtype"}
    return {**raw, "dtype": dtype}
