"""Logit processing and next-token selection: the plain reference path, and the switch to XLA:CPU's fast path.

Decoding settings (``gen_config``) are a `imgllm.language.decoding.GenerationConfig`: ``do_sample``,
``temperature``, ``top_k`` (0 = off), ``top_p`` (1.0 = off) and ``sampler``, the one switch between two
implementations of the same distributions:

- ``"plain"``: greedy ``jnp.argmax``; sampling applies temperature, top-k, then the top-p nucleus by sort + cumsum
  (`top_p_logits`), and draws with ``jax.random.categorical``. This is what runs on GPU/TPU, and the oracle that
  tests hold the fast path to.
- ``"cpu"``: `imgllm.language.sampling_cpu`, the same distributions from passes XLA:CPU runs fast (no sort, no
  noise per vocabulary entry, no value-and-index reduction).

``"auto"`` (the default) is "cpu" on CPU and "plain" elsewhere, chosen when the program is lowered, for each
platform it is lowered for (`lax.platform_dependent`, in `_per_platform`), not by the host that traces it: one
jitted function runs the CPU path on CPU and the plain path on GPU/TPU, and a program exported from a CPU host for
("cuda", "tpu") holds no CPU path (tests/test_lowering.py).
The two paths draw different tokens from the same key; greedy tokens are identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from imgllm.language import sampling_cpu

SAMPLERS = ("plain", "cpu")
# What sampler "auto" runs per platform (`lax.platform_dependent`'s names); other platforms run "plain".
AUTO_SAMPLERS = {"cpu": "cpu"}


def resolve_sampler(sampler: str, backend: str | None = None) -> str:
    """Checks ``sampler`` ("auto", "plain" or "cpu") and returns it; with a ``backend`` named ("cpu", "gpu",
    "tpu"), "auto" becomes what it runs there ("cpu" on CPU, "plain" elsewhere). Without one, "auto" stays "auto":
    `select_tokens` chooses when the program is lowered, per platform."""
    if sampler not in ("auto", *SAMPLERS):
        raise ValueError(f"sampler must be 'auto', 'plain' or 'cpu', got {sampler!r}")
    if sampler != "auto" or backend is None:
        return sampler
    return AUTO_SAMPLERS.get(backend, "plain")


def _per_platform(fn: Callable, gen_config, *args):
    """``fn(*args, gen_config)``; for sampler "auto", with the sampler of the platform the program is lowered for
    (`AUTO_SAMPLERS`, else "plain"): both are traced, lowering keeps one."""
    if gen_config.sampler != "auto":
        return fn(*args, gen_config)

    def on(sampler: str) -> Callable:
        config = dataclasses.replace(gen_config, sampler=sampler)
        return lambda *a: fn(*a, config)

    per_platform = {platform: on(sampler) for platform, sampler in AUTO_SAMPLERS.items()}
    return jax.lax.platform_dependent(*args, **per_platform, default=on("plain"))


def temperature_top_k(logits: jax.Array, gen_config) -> jax.Array:
    """Logits divided by the temperature, with -inf outside the top_k largest (when top_k > 0)."""
    if gen_config.temperature != 1.0:
        logits = logits / jnp.float32(gen_config.temperature)
    if gen_config.top_k > 0:
        kth_largest = jax.lax.top_k(logits, gen_config.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    return logits


def top_p_logits(logits: jax.Array, top_p: float) -> jax.Array:
    """Logits [B, V] with -inf outside the top-p nucleus: the smallest set of most likely tokens holding top_p of
    the probability mass (always at least one token). Sort, cumulative sum, cut where the mass before a token
    reaches top_p; tokens tied with the last kept one are kept too."""
    sorted_logits = jnp.sort(logits, axis=-1, descending=True)
    sorted_probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    threshold = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def process_logits(logits: jax.Array, gen_config) -> jax.Array:
    """Applies the sampling warpers in transformers' order: temperature, top-k, top-p. Removed tokens get -inf.

    A no-op unless ``do_sample`` (transformers applies these only when sampling). The nucleus comes from
    `top_p_logits`, or on the "cpu" sampler from `sampling_cpu.top_p_threshold` (the same set, without a sort).
    """
    if not gen_config.do_sample:
        return logits
    logits = temperature_top_k(logits, gen_config)
    if gen_config.top_p >= 1.0:
        return logits
    return _per_platform(_top_p_by_sampler, gen_config, logits)


def _top_p_by_sampler(logits: jax.Array, gen_config) -> jax.Array:
    if gen_config.sampler == "cpu":
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.where(probs >= sampling_cpu.top_p_threshold(probs, gen_config.top_p), logits, -jnp.inf)
    return top_p_logits(logits, gen_config.top_p)


def select_tokens(logits: jax.Array, rng: jax.Array, gen_config) -> jax.Array:
    """Next token per row, int32 [B]: argmax when greedy, else a sample from `process_logits`' distribution,
    by the plain path or XLA:CPU's (``gen_config.sampler``; "auto": per lowering platform)."""
    return _per_platform(_select_tokens_by_sampler, gen_config, logits, rng)


def _select_tokens_by_sampler(logits: jax.Array, rng: jax.Array, gen_config) -> jax.Array:
    if gen_config.sampler == "cpu":
        return _select_tokens_cpu(logits, rng, gen_config)
    return select_tokens_plain(logits, rng, gen_config)


def select_tokens_plain(logits: jax.Array, rng: jax.Array, gen_config) -> jax.Array:
    """`select_tokens` the textbook way: argmax, or ``jax.random.categorical`` on the processed logits."""
    if not gen_config.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    processed = process_logits(logits.astype(jnp.float32), gen_config)
    return jax.random.categorical(rng, processed, axis=-1).astype(jnp.int32)


def _select_tokens_cpu(logits: jax.Array, rng: jax.Array, gen_config) -> jax.Array:
    """`select_tokens` by `sampling_cpu`: the same distribution, drawn from unnormalised weights."""
    if not gen_config.do_sample:
        return sampling_cpu.argmax_first(logits)
    weights, _ = shifted_exp(temperature_top_k(logits, gen_config))
    if gen_config.top_p < 1.0:
        return sampling_cpu.draw_top_p(weights, gen_config.top_p, rng)
    return sampling_cpu.draw_categorical(weights, rng)


def shifted_exp(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(exp(logits - row max) [B, V] float32, row max [B, 1]): softmax without its division.

    Sampling needs the probabilities only up to a factor per row, and the decoding loop scores tokens from the same
    max and exponentials (`token_log_probs`), which XLA then computes once for both.
    """
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return jnp.exp(logits - top), top


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[row, tokens[row]] [B], from `shifted_exp`'s max and sum."""
    weights, top = shifted_exp(logits)
    total = jnp.sum(weights, axis=-1)
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - top[:, 0] - jnp.log(total)
