"""XLA:CPU's fast path for token selection: what `imgllm.language.sampling` runs when the sampler is "cpu".

The plain path (`sampling.select_tokens_plain`: sort + cumsum nucleus, ``jax.random.categorical``, ``jnp.argmax``)
reads in a few lines and is what GPU/TPU run. On XLA:CPU each of its steps is slow at GPT-2's 50,257 entries:
sorting a row, drawing Gumbel noise for every logit, and argmax (one reduction carrying value and index). The
functions here give the same distributions from cheap passes over the vocabulary:

- `argmax_first`: greedy argmax as a max and a min (two plain reductions);
- `draw_categorical`: inverts the cumulative distribution by blocks (`_BlockCDF`), one uniform number per row;
- `draw_top_p`: top-p by rejection (draw from the whole distribution, keep a draw that lies in the nucleus), with a
  bisection fallback (`top_p_threshold`) that finds the nucleus without sorting.

Tests compare each against the plain path (tests/test_sampling.py); benchmarks/README.md holds the measured gains.
Everything here takes arrays only (no config), so it is usable on its own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def argmax_first(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, axis=-1)`` as int32 (the first index of each row's maximum), computed as a max and
    then the smallest index that equals it: two plain reductions, which XLA:CPU runs faster than its argmax (one
    reduction carrying value and index). Rows holding NaN give an index in range (the last) instead of NaN's."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    size = logits.shape[-1]
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.minimum(jnp.min(jnp.where(logits == top, index, size), axis=-1), size - 1)


def top_p_threshold(probs: jax.Array, top_p: float, iterations: int = 32) -> jax.Array:
    """Threshold [B, 1] such that {probs >= threshold} is the smallest set of most likely tokens holding top_p of
    the mass (at least one token): the sort + cumsum nucleus, found without sorting.

    That set is {tokens with probability >= t} for the largest threshold t whose set still holds top_p of the
    mass, found by bisection on t: a few dozen masked sums over the vocabulary instead of a sort per row (slow on
    XLA:CPU). 32 halvings reach float32 resolution, so the set equals the sorted one except for tokens whose
    probabilities tie within rounding at the boundary.
    """

    def halve(_, bounds):
        feasible_t, infeasible_t = bounds  # mass(probs >= feasible_t) >= top_p > mass(probs >= infeasible_t)
        middle = (feasible_t + infeasible_t) / 2
        reaches = jnp.sum(jnp.where(probs >= middle, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(reaches, middle, feasible_t), jnp.where(reaches, infeasible_t, middle)

    # The most likely token alone may already reach top_p: then it is the set (at least one token is kept).
    top = jnp.max(probs, axis=-1, keepdims=True)
    start = (jnp.where(top >= top_p, top, 0.0), jnp.where(top >= top_p, jnp.inf, top))
    threshold, _ = jax.lax.fori_loop(0, iterations, halve, start)
    return threshold


def bisected_nucleus(weights: jax.Array, total: jax.Array, top_p: float) -> jax.Array:
    """weights [B, V] (row sums ``total`` [B, 1]) with 0 outside the top-p nucleus found by `top_p_threshold`."""
    probs = weights / total
    return jnp.where(probs >= top_p_threshold(probs, top_p), weights, 0.0)


def draw_categorical(weights: jax.Array, rng: jax.Array) -> jax.Array:
    """One index per row of non-negative weights [B, V], drawn with probability weight / row sum. int32 [B].

    Inverts the cumulative distribution at one uniform number per row, by blocks (`_BlockCDF`): one pass over the
    weights, where ``jax.random.categorical`` (Gumbel noise for every logit, then an argmax) costs a random number
    per vocabulary entry. Only indices of positive weight are ever drawn. Rows need a positive sum.
    """
    return _BlockCDF.of(weights).draw(rng)


class _BlockCDF(NamedTuple):
    """The cumulative distribution of weights [B, V] by blocks, for drawing indices by inverting it.

    The CDF of the block sums picks a block, then the CDF inside that block (`_index_reaching`) picks the index.
    Building it is one pass over the weights; each draw reads one block per row, so drawing again from the same
    weights (rejection sampling, `draw_top_p`) costs next to nothing.
    """

    blocks: jax.Array  # [B, nb, block]: the weights, zero-padded to whole blocks (see `_as_blocks`)
    block_mass: jax.Array  # [B, nb]
    block_cdf: jax.Array  # [B, nb]

    @classmethod
    def of(cls, weights: jax.Array) -> _BlockCDF:
        return cls.of_blocks(_as_blocks(weights))

    @classmethod
    def of_blocks(cls, blocks: jax.Array) -> _BlockCDF:
        block_mass = jnp.sum(blocks, axis=-1)
        return cls(blocks, block_mass, jnp.cumsum(block_mass, axis=-1))

    @property
    def total(self) -> jax.Array:
        """The sum of each row's weights [B]."""
        return self.block_cdf[:, -1]

    def draw(self, rng: jax.Array) -> jax.Array:
        """One index per row, int32 [B]."""
        target = (1.0 - jax.random.uniform(rng, (self.blocks.shape[0],))) * self.total  # in (0, total]
        return self.index_reaching(target).astype(jnp.int32)

    def index_reaching(self, target: jax.Array) -> jax.Array:
        """Per row, the first index whose running sum reaches target [B] (> 0), clamped to the last index of
        positive weight against rounding."""
        block = self.blocks.shape[-1]
        chosen = _first_reaching(self.block_cdf, target, self.block_mass > 0)  # [B]
        cdf_before_block = jnp.pad(self.block_cdf[:, :-1], ((0, 0), (1, 0)))  # 0, cdf[0], ...
        mass_before = jnp.take_along_axis(cdf_before_block, chosen[:, None], axis=1)[:, 0]
        inside = jnp.take_along_axis(self.blocks, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
        return chosen * block + _index_reaching(inside, target - mass_before)


_SCAN_BLOCK = 256  # blocks of at most this many weights get a plain cumulative sum


def _as_blocks(weights: jax.Array) -> jax.Array:
    """weights [B, V] as [B, V / d, d] blocks: a free reshape when V has a divisor d between 64 and 4,096 with at
    most 4,096 blocks (GPT-2's 50,257 = 29 x 1,733), else zero-padded to blocks of 256 (a copy of the weights)."""
    size = weights.shape[-1]
    divisors = [d for d in range(64, 4097) if size % d == 0 and size // d <= 4096]
    if divisors:
        block = min(divisors, key=lambda d: abs(np.log(d) - 0.5 * np.log(size)))
        return weights.reshape(weights.shape[0], size // block, block)
    return _padded_blocks(weights)


def _padded_blocks(weights: jax.Array) -> jax.Array:
    """weights [B, n] zero-padded to whole blocks of 256: [B, ceil(n / 256), 256]."""
    num_blocks = -(-weights.shape[-1] // _SCAN_BLOCK)
    padded = jnp.pad(weights, ((0, 0), (0, num_blocks * _SCAN_BLOCK - weights.shape[-1])))
    return padded.reshape(weights.shape[0], num_blocks, _SCAN_BLOCK)


def _index_reaching(weights: jax.Array, target: jax.Array) -> jax.Array:
    """Per row of weights [B, n], the first index whose running sum reaches target [B] (> 0), clamped to the last
    index of positive weight against rounding. Rows longer than 256 go by blocks of 256 (`_BlockCDF`), so that no
    cumulative sum is longer (XLA:CPU's cumsum is a reduce-window: quadratic in the length)."""
    if weights.shape[-1] <= _SCAN_BLOCK:
        return _first_reaching(jnp.cumsum(weights, axis=-1), target, weights > 0)
    return _BlockCDF.of_blocks(_padded_blocks(weights)).index_reaching(target)


def _first_reaching(cdf: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
    """Per row, the first index whose cdf [B, n] reaches target [B], clamped to the last index with positive
    weight."""
    first = jnp.sum(cdf < target[:, None], axis=-1)
    last_positive = cdf.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.minimum(first, last_positive)


# Rejection rounds after the first test only the undecided rows when they are at most 1/_RETEST_FRACTION of the batch.
_RETEST_FRACTION = 8


def draw_top_p(weights: jax.Array, top_p: float, rng: jax.Array, max_rounds: int = 8) -> jax.Array:
    """One token per row of non-negative weights [B, V] (probabilities up to a factor per row), drawn from the
    top-p nucleus (the smallest set of most likely tokens holding top_p of the mass) in proportion to the
    weights. int32 [B].

    Rejection sampling, where finding the nucleus first (`top_p_threshold`) costs 32 masked sums per step:
    draw a token from the whole distribution, and keep it if it is in the nucleus, that is if the tokens strictly
    more likely than it hold less than top_p of the mass. A kept draw is distributed exactly as a draw from the
    nucleus; a row keeps a draw with probability >= top_p per round, so a round costs one masked sum and most
    batches finish in 2-4 rounds at top_p = 0.9 (re-drawing from the same CDF is nearly free). Once at most an
    eighth of the rows are undecided, a round tests only those rows, gathered: at top_p = 0.9 that is every round
    after the first. Which rows a round tests never depends on their new draws, so kept draws stay exact. Rows
    still without a token after ``max_rounds`` (small top_p, flat distributions) draw from the nucleus found by
    bisection, so the result is exact in every case; that fallback runs only when some row needs it.
    """
    cdf = _BlockCDF.of(weights)
    mass_to_reach = top_p * cdf.total
    batch = weights.shape[0]
    few = max(1, batch // _RETEST_FRACTION)

    def in_nucleus(row_weights, token, mass):
        """Whether token [R] is in the nucleus of its row: the strictly more likely tokens hold less than mass."""
        weight = jnp.take_along_axis(row_weights, token[:, None], axis=1)
        return jnp.sum(jnp.where(row_weights > weight, row_weights, 0.0), axis=-1) < mass

    def in_nucleus_if_undecided(token, done):
        """in_nucleus for up to `few` undecided rows, gathered; False for the other rows (they draw again)."""
        rows = jnp.nonzero(~done, size=few, fill_value=batch)[0]
        gather = lambda a: jnp.take(a, rows, axis=0, mode="clip")
        kept = in_nucleus(gather(weights), gather(token), gather(mass_to_reach))
        return jnp.zeros((batch,), bool).at[rows].set(kept, mode="drop")

    def draw_round(carry):
        round_index, token, done = carry
        candidate = cdf.draw(jax.random.fold_in(rng, round_index))
        kept = jax.lax.cond(
            jnp.sum(~done) > few,
            lambda token, _: in_nucleus(weights, token, mass_to_reach),
            in_nucleus_if_undecided,
            candidate,
            done,
        )
        return round_index + 1, jnp.where(done, token, candidate), done | kept

    start = (jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
    _, token, done = jax.lax.while_loop(lambda c: (c[0] < max_rounds) & ~jnp.all(c[2]), draw_round, start)

    def from_bisected_nucleus(token):
        nucleus = bisected_nucleus(weights, cdf.total[:, None], top_p)
        return jnp.where(done, token, draw_categorical(nucleus, jax.random.fold_in(rng, max_rounds)))

    return jax.lax.cond(jnp.all(done), lambda token: token, from_bisected_nucleus, token)
