"""The train state: everything that changes during training, as one pytree (checkpointed as a whole)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Pure data; the optimizer (`optax.GradientTransformation`) is passed to the step, not stored.

    step: number of updates done (int32); the data position and the step's random key derive from it.
    params: trainable parameters.  model_state: the other flax collections (e.g. {"batch_stats": ...}).
    opt_state: optax state.  lookahead: the slow (EMA) copy {"params", "model_state"} used by lookahead,
    or {} when lookahead is off.  rng: base key data (uint32 [2]); step key = fold_in(rng, step).
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    lookahead: Any
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """The flax variables dict for `model.apply`."""
        return {"params": self.params, **self.model_state}


def create_train_state(
    variables: dict[str, Any], tx: optax.GradientTransformation, rng: jax.Array, *, use_lookahead: bool
) -> TrainState:
    """A step-0 state from flax `variables`, the optimizer and a base key."""
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    lookahead = {"params": params, "model_state": model_state} if use_lookahead else {}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        lookahead=lookahead,
        rng=jnp.asarray(rng, jnp.uint32),
    )
