"""Optimizer and learning-rate schedule from a config, with per-parameter groups.

Learning rates depend on the batch size, so a config gives them for `reference_batch_size` examples per update
and `make_optimizer` scales them to the run's batch at run time (the linear scaling rule, as flax's imagenet
example does with `config.learning_rate * config.batch_size / 256.`): overriding `global_batch_size` keeps the
recipe. With no reference batch size the learning rates are used as given. Weight decay coefficients are not
scaled: SGD adds them to the gradient, so each step's shrink (lr x decay) already follows the learning rate.

Groups (config.optimizer.groups, name -> fields below) select parameters by a regular expression on their
'/'-joined path, e.g. airbench's BatchNorm biases (64x learning rate, same decay strength), a whitening stem that
is frozen or trained only for its first epochs, or conv kernels trained with Muon while the rest uses SGD.
Parameters matching no group are in the "default" group. A group's fields:
    pattern             regular expression on the parameter path (the first matching group, in config order, wins)
    lr_scale            its learning rate is the default group's times this (0: frozen), or
    learning_rate       its own peak learning rate (at the reference batch size), instead of lr_scale
    scale_with_batch    False: its learning rate stays as given for any batch size (default True; Muon's
                        orthogonalised update has no loss scale, so its lr does not follow the batch)
    weight_decay_scale  its decay is config.optimizer.weight_decay times this (default 1)
    train_epochs        updates stop after this many epochs (None: never)
    optimizer, momentum its own optimizer ("sgd" | "adamw" | "muon") and momentum (default: the config's)

Muon (Jordan et al. 2024, used by airbench94_muon): Nesterov momentum, then each kernel's update, as a matrix
[out, fan_in], replaced by an approximately orthogonal one (`orthogonalize`, a Newton-Schulz iteration), and
each kernel rescaled to a fixed norm sqrt(out) before the step, so that the learning rate alone sets how fast
the kernels turn.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

DEFAULT_GROUP = "default"


def make_schedule(
    cfg: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int, learning_rate: float | None = None
) -> optax.Schedule:
    """Learning rate as a function of the update count, peaking at `learning_rate` (default cfg.learning_rate).

    cfg.schedule: "constant"; "triangle" (airbench: linear from start_factor to 1 at peak_fraction of
    training, then linear to end_factor); "warmup_cosine" (linear warm-up for warmup_epochs, cosine to 0).
    """
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "triangle":
        xp = jnp.array([0.0, float(int(cfg.peak_fraction * total_steps)), float(total_steps)])
        fp = jnp.array([cfg.start_factor, 1.0, cfg.end_factor])
        return lambda count: lr * jnp.interp(count.astype(jnp.float32), xp, fp)
    if cfg.schedule == "warmup_cosine":
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps=max(warmup, 1), decay_steps=max(total_steps, warmup + 1)
        )
    raise ValueError(f"config.optimizer.schedule={cfg.schedule!r}: expected 'constant', 'triangle' or 'warmup_cosine'")


def param_labels(params: Any, groups: ml_collections.ConfigDict) -> Any:
    """Tree of group names matching `params`: the first group (in config order) whose pattern matches."""
    compiled = [(name, re.compile(g.pattern)) for name, g in groups.items()]

    def label(path, _):
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        return next((name for name, rx in compiled if rx.search(key)), DEFAULT_GROUP)

    return jax.tree_util.tree_map_with_path(label, params)


OPTIMIZERS = ("sgd", "adamw", "muon")

# Quintic Newton-Schulz coefficients of Muon / airbench94_muon: chosen for the steepest slope at zero, so that a
# few steps take every singular value into about [0.7, 1.2] (not exactly 1, which does not hurt training).
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: jax.Array, steps: int = 3, eps: float = 1e-7) -> jax.Array:
    """An approximately orthogonal matrix with the singular vectors of `matrix` [m, n] (roughly U Vᵀ of its SVD).

    Newton-Schulz: x <- a x + (b A + c A²) x with A = x xᵀ, after scaling to Frobenius norm 1 (so every singular
    value is at most 1). Works on the wide orientation (m <= n), so that A is the smaller Gram matrix.
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if tall else matrix
    x = x / (jnp.linalg.norm(x) + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _as_matrix(kernel: jax.Array) -> jax.Array:
    """A kernel as [out, fan_in]: the output features are the last axis (flax's HWIO conv and [in, out] dense)."""
    return kernel.reshape(-1, kernel.shape[-1]).T


def _orthogonalized_updates(ns_steps: int) -> optax.GradientTransformation:
    """Replaces each update (a kernel of >= 2 dims) by `orthogonalize` of its [out, fan_in] matrix."""

    def orthogonalized(path, u):
        if u.ndim < 2:
            raise ValueError(
                f"Muon needs kernels of 2 or more dims; {jax.tree_util.keystr(path)} has shape {u.shape}: "
                "give it another optimizer group"
            )
        return orthogonalize(_as_matrix(u), ns_steps).T.reshape(u.shape)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(orthogonalized, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _normalized_weights() -> optax.GradientTransformation:
    """Adds to each update what rescales its kernel to Frobenius norm sqrt(out) first (airbench94_muon's
    `p *= sqrt(len(p)) / |p|`): new = p * sqrt(out) / |p| + update."""

    def update(updates, state, params):
        if params is None:
            raise ValueError("Muon's weight normalisation needs params: call tx.update(grads, state, params)")
        rescale = lambda p: p * (jnp.sqrt(jnp.float32(p.shape[-1])) / jnp.linalg.norm(p) - 1.0)
        return jax.tree.map(lambda u, p: u + rescale(p).astype(u.dtype), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def muon(
    learning_rate: optax.ScalarOrSchedule, momentum: float = 0.6, nesterov: bool = True, ns_steps: int = 3
) -> optax.GradientTransformation:
    """airbench94_muon's Muon for conv kernels: momentum, orthogonalised update, weights kept at norm sqrt(out)."""
    return optax.chain(
        optax.trace(momentum, nesterov=nesterov),
        _orthogonalized_updates(ns_steps),
        optax.scale_by_learning_rate(learning_rate),
        _normalized_weights(),
    )


def batch_scale(cfg: ml_collections.ConfigDict, batch_size: int | None) -> float:
    """The factor learning rates given for cfg.reference_batch_size take at `batch_size` examples per update
    (batch_size / reference_batch_size); 1 when the config gives no reference batch size."""
    reference = cfg.get("reference_batch_size")
    if reference is None:
        return 1.0
    if batch_size is None:
        raise ValueError(
            f"config.optimizer.reference_batch_size={reference}: the optimizer needs the run's "
            "batch size to scale the learning rates"
        )
    return batch_size / reference


@dataclasses.dataclass(frozen=True)
class GroupRates:
    """One group's learning rate and weight decay at the run's batch size.

    Its learning rate is a schedule peaking at `schedule_peak`, times `lr_scale` (kept apart so that a group tied
    to the default group's schedule computes exactly as that schedule times its scale).
    """

    schedule_peak: float
    lr_scale: float
    weight_decay: float

    @property
    def peak_learning_rate(self) -> float:
        return self.schedule_peak * self.lr_scale


def group_rates(cfg: ml_collections.ConfigDict, batch_size: int | None = None) -> dict[str, GroupRates]:
    """GroupRates of the "default" group and of every group in cfg.groups, at `batch_size` examples per update."""
    scale = batch_scale(cfg, batch_size)
    default_peak = cfg.learning_rate * scale
    rates = {DEFAULT_GROUP: GroupRates(default_peak, 1.0, cfg.weight_decay)}
    for name, g in cfg.get("groups", ml_collections.ConfigDict()).items():
        follows_batch = g.get("scale_with_batch", True)
        weight_decay = cfg.weight_decay * g.get("weight_decay_scale", 1.0)
        if g.get("learning_rate") is not None:
            if g.get("lr_scale") is not None:
                raise ValueError(f"config.optimizer.groups.{name} gives both learning_rate and lr_scale: keep one")
            rates[name] = GroupRates(g.learning_rate * (scale if follows_batch else 1.0), 1.0, weight_decay)
        else:
            lr_scale = g.get("lr_scale", 1.0) * (1.0 if follows_batch else 1.0 / scale)
            rates[name] = GroupRates(default_peak, lr_scale, weight_decay)
    return rates


def default_learning_rate(
    cfg: ml_collections.ConfigDict, *, total_steps: int, steps_per_epoch: int, batch_size: int | None = None
) -> optax.Schedule:
    """The default group's learning rate at each update (count 0 is the first step), as the optimizer applies it:
    what training logs as learning_rate."""
    peak = group_rates(cfg, batch_size)[DEFAULT_GROUP].peak_learning_rate
    return make_schedule(cfg, total_steps, steps_per_epoch, learning_rate=peak)


def _base_transform(
    cfg: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    lr_scale: float,
    weight_decay: float,
    name: str | None = None,
    momentum: float | None = None,
) -> optax.GradientTransformation:
    """The optimizer proper for one group: `name` (default cfg.name) with the group's lr, decay and momentum.

    Weight decay is coupled to the learning rate for SGD, decoupled for AdamW; Muon has none (its kernels keep a
    fixed norm instead).
    """
    name = name or cfg.name
    momentum = cfg.momentum if momentum is None else momentum
    scaled = lambda count: schedule(count) * lr_scale
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay), optax.sgd(scaled, momentum=momentum or None, nesterov=cfg.nesterov)
        )
    if name == "adamw":
        return optax.adamw(scaled, b1=cfg.b1, b2=cfg.b2, weight_decay=weight_decay)
    if name == "muon":
        return muon(scaled, momentum=momentum, nesterov=cfg.nesterov)
    raise ValueError(f"optimizer {name!r}: expected one of {OPTIMIZERS}")


def _stop_after(steps: int) -> optax.GradientTransformation:
    """Zeroes updates from update number `steps` on (a parameter trained only for its first epochs)."""
    return optax.scale_by_schedule(lambda count: (count < steps).astype(jnp.float32))


def make_optimizer(
    cfg: ml_collections.ConfigDict,
    params: Any,
    *,
    total_steps: int,
    steps_per_epoch: int,
    batch_size: int | None = None,
    default_schedule: optax.Schedule | None = None,
) -> optax.GradientTransformation:
    """The full optax transformation for `params` (only its tree structure and names are used).

    `batch_size` is the run's global batch size, which the learning rates scale to (see `group_rates`).
    `default_schedule`: the default group's schedule when the caller already made it (`default_learning_rate`, e.g.
    the trainer's, which it also logs): used, not made again.
    """
    groups = cfg.get("groups", ml_collections.ConfigDict())
    rates = group_rates(cfg, batch_size)
    schedules: dict[float, optax.Schedule] = {}
    if default_schedule is not None:
        schedules[rates[DEFAULT_GROUP].schedule_peak] = default_schedule

    def schedule_peaking_at(peak: float) -> optax.Schedule:
        if peak not in schedules:
            schedules[peak] = make_schedule(cfg, total_steps, steps_per_epoch, learning_rate=peak)
        return schedules[peak]

    transforms: dict[str, optax.GradientTransformation] = {}
    for name, r in rates.items():
        g = groups[name] if name in groups else ml_collections.ConfigDict()
        if g.get("lr_scale") == 0 or g.get("learning_rate") == 0:  # a frozen group: no optimizer state
            transforms[name] = optax.set_to_zero()
            continue
        tx = _base_transform(
            cfg, schedule_peaking_at(r.schedule_peak), r.lr_scale, r.weight_decay, g.get("optimizer"), g.get("momentum")
        )
        if g.get("train_epochs") is not None:
            tx = optax.chain(tx, _stop_after(int(math.ceil(g.train_epochs * steps_per_epoch))))
        transforms[name] = tx
    tx = optax.multi_transform(transforms, param_labels(params, groups))
    if cfg.get("grad_clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx


def lookahead_update(
    new: dict[str, Any],
    slow: dict[str, Any],
    step: jax.Array,
    cfg: ml_collections.ConfigDict,
    *,
    steps_per_epoch: int,
    total_steps: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """airbench's lookahead / EMA: returns (fast, slow) weights after update number `step` (1-based).

    From epoch cfg.start_epochs on, every cfg.every_n_steps updates the slow copy moves towards the fast one,
    slow <- rho*slow + (1-rho)*fast with rho = decay_base**every_n_steps * (step/total)**decay_pow (so it
    averages more strongly towards the end), and the fast weights restart from it; after the last update the fast
    weights become the slow ones (what is evaluated and saved), as airbench94's final `update(decay=1.0)`.
    Before cfg.start_epochs the slow copy follows the fast one. `new`/`slow` are {"params", "model_state"} trees
    (BatchNorm statistics are averaged too).
    """
    start_step = int(cfg.start_epochs * steps_per_epoch)
    every = int(cfg.every_n_steps)
    first = (start_step // every + 1) * every  # first update count that is a lookahead step
    qualifies = (step % every == 0) & (step >= first)
    rho = jnp.where(
        step == first, 0.0, cfg.decay_base**every * (step.astype(jnp.float32) / total_steps) ** cfg.decay_pow
    )
    following = step < first

    def slow_leaf(f, s):
        moved = s + (1.0 - rho).astype(s.dtype) * (f - s)
        return jnp.where(following, f, jnp.where(qualifies, moved, s))

    new_slow = jax.tree.map(slow_leaf, new, slow)
    reset = ~following & (qualifies | (step == total_steps))
    new_fast = jax.tree.map(lambda f, s: jnp.where(reset, s, f), new, new_slow)
    return new_fast, new_slow


def lookahead_fn(cfg: ml_collections.ConfigDict | None, *, steps_per_epoch: int, total_steps: int) -> Callable | None:
    """`lookahead_update` bound to its schedule, or None when cfg is missing or disabled."""
    if cfg is None or not cfg.get("enabled", False):
        return None
    return lambda new, slow, step: lookahead_update(
        new, slow, step, cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
