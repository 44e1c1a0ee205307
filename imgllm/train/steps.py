"""Pure train and eval steps, and their jitted, sharded forms.

The steps see global arrays: the batch is sharded on the mesh's 'data' axis, the state replicated; the loss
is a mean over the global batch, so XLA all-reduces gradients and BatchNorm statistics across devices/hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from imgllm import parallel
from imgllm.train import feed
from imgllm.train.state import TrainState
from imgllm.train.task_protocol import Metrics, Task, metric


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    task: Task,
    tx: optax.GradientTransformation,
    steps_per_epoch: int,
    lookahead: Callable | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on `batch`; returns the new state and the step's metric sums.

    The step's randomness is fold_in(state.rng, state.step): the same step gets the same key on resume.
    Adds objective (the differentiated loss), l2_grads and l2_params (global norms) to the task's metrics.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    epoch = state.step // steps_per_epoch
    grad_fn = jax.value_and_grad(task.loss, has_aux=True)
    (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, rng, epoch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    slow = state.lookahead
    if lookahead is not None:
        fast, slow = lookahead({"params": params, "model_state": model_state}, slow, step)
        params, model_state = fast["params"], fast["model_state"]
    metrics = dict(metrics)
    metrics["objective"] = metric(loss, 1.0)  # what was differentiated; checked for NaN/inf by the loop
    metrics["l2_grads"] = metric(optax.tree.norm(grads), 1.0)
    metrics["l2_params"] = metric(optax.tree.norm(params), 1.0)
    new_state = state.replace(step=step, params=params, model_state=model_state, opt_state=opt_state, lookahead=slow)
    return new_state, metrics


def eval_step(variables: dict[str, Any], batch: Mapping[str, jax.Array], *, task: Task, tta: bool) -> Metrics:
    """Metric sums of `task` on one (masked) batch."""
    return task.eval_metrics(variables, batch, tta=tta)


def jit_train_step(
    task: Task,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    steps_per_epoch: int,
    lookahead: Callable | None = None,
    placement: str = "host",
) -> Callable:
    """`train_step` jitted with the state replicated (and donated).

    placement "host": called as step(state, batch), the batch sharded on 'data'. "device": called as
    step(state, data, order) with the whole training set and the epoch's order replicated on every device
    (`imgllm.train.feed`); the step gathers its own batch.
    """
    fn = partial(train_step, task=task, tx=tx, steps_per_epoch=steps_per_epoch, lookahead=lookahead)
    replicated = parallel.replicated_sharding(mesh)
    if placement == "device":

        def step_on_device_data(state, data, order):
            return fn(state, feed.gather_rows(data, order, state.step, steps_per_epoch, mesh))

        return jax.jit(
            step_on_device_data,
            in_shardings=(replicated, replicated, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
    return jax.jit(
        fn,
        in_shardings=(replicated, parallel.data_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def jit_eval_step(task: Task, mesh: Mesh, *, tta: bool) -> Callable:
    """`eval_step` jitted: variables replicated, batch sharded on 'data', metric sums replicated."""
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(
        partial(eval_step, task=task, tta=tta),
        in_shardings=(replicated, parallel.data_sharding(mesh)),
        out_shardings=replicated,
    )


def jit_init_state(init: Callable[..., TrainState], mesh: Mesh) -> Callable[..., TrainState]:
    """A state initialiser (from host arrays) whose output is placed replicated on the mesh."""
    return jax.jit(init, out_shardings=parallel.replicated_sharding(mesh))
