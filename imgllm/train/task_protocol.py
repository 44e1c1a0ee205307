"""The Task protocol: what the generic training loop needs from a model + data + loss.

The loop (`imgllm.train.loop`) owns the train state, data order, sharding, checkpoints, logging and NaN
checks; a Task owns the model and the meaning of a batch. The image classifier
(`imgllm.train.classifier.ClassifierTask`) is one Task; a next-token language model or a captioner is
another, reusing the same loop, state, checkpoints and configs. imgllm's tasks subclass `Task` (so they inherit
the defaults of its optional capabilities); `imgllm.train.registry.TASKS` names them.

Metrics are *sums plus a denominator* (as in flax's lm1b example): a dict name -> (sum, count) of scalars,
so they add up exactly across steps, devices and hosts and are divided only when reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, tuple[jax.Array, jax.Array]]  # name -> (sum, count)
Arrays = Mapping[str, np.ndarray]  # equal leading dimension; a batch picks rows
CalibrateFn = Callable[..., dict[str, float]]  # (variables, arrays, *, batch_size, fitted=None)
ConfusionFn = Callable[..., np.ndarray]  # (variables, arrays, *, batch_size, tta)
SampleCaptionsFn = Callable[[Any, Arrays], list[tuple[str, str]]]  # (variables, arrays)


class Task(Protocol):
    """A trainable problem. All array methods are pure and traced inside `jax.jit`."""

    def train_arrays(self) -> Arrays:
        """Host-resident training examples (e.g. {"images": uint8 [N,H,W,3], "labels": int32 [N], ...})."""

    def eval_arrays(
        self, split: str | None = None, source: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> Arrays | None:
        """Examples for evaluation (None: no evaluation). The loop adds a float "mask" field to each batch.

        Defaults: the config's eval split of its own data. `source` names another data source (e.g. an
        image folder) and `metadata` is the checkpoint's `checkpoint_metadata()`, to map its labels.
        """

    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        """Flax variables {"params": ..., other collections} for a fresh model; data-independent, traceable."""

    def prepare_variables(self, variables: dict[str, Any], train_arrays: Arrays) -> dict[str, Any]:
        """Data-dependent initialisation on the host (e.g. a whitening stem); identity when there is none."""

    def loss(
        self, params: Any, model_state: dict[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array, epoch: jax.Array
    ) -> tuple[jax.Array, tuple[Metrics, dict[str, Any]]]:
        """Training loss (mean over the global batch), with (metrics, updated non-param collections)."""

    def eval_metrics(self, variables: dict[str, Any], batch: Mapping[str, jax.Array], *, tta: bool) -> Metrics:
        """Metric sums on a batch, weighting every example by batch["mask"]; `tta` asks for test-time augmentation."""

    def checkpoint_metadata(self) -> dict[str, Any]:
        """JSON-able facts stored with every checkpoint that evaluation needs (e.g. class names)."""

    # Optional capabilities: a task that lacks one keeps the default None (subclass `Task` to inherit them), and
    # the loop and `imgllm.train.evaluation` skip what is None. Their passes over the images use
    # `imgllm.data.batching.padded_batch_outputs`.
    calibrate: CalibrateFn | None = None
    """calibrate(variables, arrays, *, batch_size, fitted=None) -> dict: `imgllm.calibration.calibration_report` on
    arrays. At the end of training the fit on the validation split (stored in the checkpoint's meta["calibration"]
    and added to the final eval), or with `fitted` (a stored fit) its calibration error on another split."""

    confusion: ConfusionFn | None = None
    """confusion(variables, arrays, *, batch_size, tta) -> int64 [classes, classes] counts (true, predicted)."""

    sample_captions: SampleCaptionsFn | None = None
    """sample_captions(variables, arrays) -> [(class name, caption)]: a few greedy captions of evaluation images,
    written to TensorBoard at the end of training."""


def metric(total: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One metric entry as float32 (sum, count)."""
    return jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)


def add_metrics(a: dict[str, tuple[float, float]] | None, b: dict[str, tuple[float, float]]) -> dict:
    """Elementwise sum of two host-side metric dicts (None is the empty sum)."""
    if a is None:
        return {k: (float(s), float(c)) for k, (s, c) in b.items()}
    return {k: (a[k][0] + float(b[k][0]), a[k][1] + float(b[k][1])) for k in a}


def summarize(metrics: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Divides every sum by its count (0 when the count is 0)."""
    return {k: (float(s) / float(c) if c else 0.0) for k, (s, c) in metrics.items()}
