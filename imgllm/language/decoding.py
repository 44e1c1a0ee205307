"""Text generation with a KV cache: prefill and cached decoding in one jit-compiled function.

``generate_tokens`` is pure and traceable (fixed shapes, ``lax.while_loop``, randomness from an explicit key), so
larger jitted functions (the image -> caption pipeline) call it directly. ``generate`` is the convenience entry
point for host data: it validates the inputs, buckets prompt lengths (left padding) so that calls with similar
prompt lengths reuse one compiled program, and shards the batch over the device mesh's ``'data'`` axis.

Semantics follow Hugging Face ``transformers`` ``generate`` for left-padded batches: position ids are
``cumsum(attention_mask) - 1`` clipped at 0, finished rows emit ``pad_token_id`` after their EOS, and beam search
reproduces transformers' vectorised beam search step by step (top 2 * num_beams candidates, length penalty
``score / generated_length ** length_penalty``, the ``early_stopping`` heuristic), so greedy and beam results are
token-identical to transformers up to floating point near-ties.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from imgllm.language.gpt2 import GPT2, GPT2Config, KVCache, bind, init_cache

# transformers' "very low score" for finished / impossible beams (kept identical so that ties resolve alike).
_BEAM_NEG = -1.0e9


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How to decode (names and meanings as in transformers' ``GenerationConfig``). Frozen: a static jit argument.

    Greedy when ``do_sample`` is False and ``num_beams`` is 1; sampling applies temperature, then top-k
    (0 = off), then top-p (1.0 = off). Beam search when ``num_beams`` > 1 (with sampling if ``do_sample``).
    ``eos_token_id`` None disables stopping at EOS. ``early_stopping``: False (transformers' default heuristic),
    True (stop a prompt once num_beams hypotheses are finished) or "never".
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    eos_token_id: int | None = 50256
    pad_token_id: int = 50256
    num_return_sequences: int = 1

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"GenerationConfig.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise ValueError(f"GenerationConfig.num_beams must be >= 1, got {self.num_beams}")
        if self.early_stopping not in (False, True, "never"):
            raise ValueError(f"GenerationConfig.early_stopping must be False, True or 'never', "
                             f"got {self.early_stopping!r}")
        if self.num_return_sequences < 1:
            raise ValueError(f"GenerationConfig.num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"GenerationConfig.num_return_sequences={self.num_return_sequences} exceeds "
                             f"num_beams={self.num_beams}")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError("GenerationConfig.num_return_sequences > 1 needs do_sample=True or num_beams > 1 "
                             "(greedy decoding would return identical copies)")

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError if a token id of this config is outside the model's vocabulary."""
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"GenerationConfig.{name}={value} is outside the vocabulary [0, {vocab_size})")
        if self.top_k > vocab_size:
            raise ValueError(f"GenerationConfig.top_k={self.top_k} exceeds the vocabulary size {vocab_size}")


# ----------------------------------------------------------------------------------------------------------------
# Logits processing and token selection


def process_logits(logits: jax.Array, gen_config: GenerationConfig) -> jax.Array:
    """Applies the sampling warpers in transformers' order: temperature, top-k, top-p. Removed tokens get -inf.

    A no-op unless ``do_sample`` (transformers applies these only when sampling).
    """
    if not gen_config.do_sample:
        return logits
    logits = _temperature_top_k(logits, gen_config)
    if gen_config.top_p < 1.0:
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        logits = jnp.where(probs >= _top_p_threshold(probs, gen_config.top_p), logits, -jnp.inf)
    return logits


def sampling_weights(logits: jax.Array, gen_config: GenerationConfig) -> jax.Array:
    """The distribution `select_tokens` samples from, as float32 weights [B, V]: softmax(process_logits(logits)) up
    to a per-row factor (removed tokens weigh 0; the kept ones are not renormalised, `draw_categorical` needs not).
    Sampling itself does not build it for top-p (`draw_top_p` is faster); it is the explicit form, for analysis."""
    weights, _ = _shifted_exp(_temperature_top_k(logits, gen_config))
    if gen_config.top_p < 1.0:
        weights = _bisected_nucleus(weights, jnp.sum(weights, axis=-1, keepdims=True), gen_config.top_p)
    return weights


def _temperature_top_k(logits: jax.Array, gen_config: GenerationConfig) -> jax.Array:
    if gen_config.temperature != 1.0:
        logits = logits / jnp.float32(gen_config.temperature)
    if gen_config.top_k > 0:
        kth_largest = jax.lax.top_k(logits, gen_config.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    return logits


def _shifted_exp(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(exp(logits - row max) [B, V] float32, row max [B, 1]): softmax without its division.

    Sampling needs the probabilities only up to a factor per row, and the decoding loop scores tokens from the same
    max and exponentials (`_log_probs`), which XLA then computes once for both: passes over [B, 50,257] are what a
    sampling step costs on CPU besides the model.
    """
    logits = logits.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    return jnp.exp(logits - top), top


def _log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[row, tokens[row]] [B], from `_shifted_exp`'s max and sum."""
    weights, top = _shifted_exp(logits)
    total = jnp.sum(weights, axis=-1)
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - top[:, 0] - jnp.log(total)


def _top_p_threshold(probs: jax.Array, top_p: float, iterations: int = 32) -> jax.Array:
    """Threshold [B, 1] such that {probs >= threshold} is the smallest set of most likely tokens holding top_p of
    the mass (at least one token).

    That set is {tokens with probability >= t} for the largest threshold t whose set still holds top_p of the
    mass, found by bisection on t: a few dozen masked sums over the vocabulary, where sorting 50,257 logits per
    row (the textbook way) costs seconds a step on XLA:CPU. 32 halvings reach float32 resolution, so the set
    equals the sorted one except for tokens whose probabilities tie within rounding at the boundary.
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


def _bisected_nucleus(weights: jax.Array, total: jax.Array, top_p: float) -> jax.Array:
    """weights [B, V] (row sums ``total`` [B, 1]) with 0 outside the top-p nucleus found by `_top_p_threshold`."""
    probs = weights / total
    return jnp.where(probs >= _top_p_threshold(probs, top_p), weights, 0.0)


def draw_categorical(weights: jax.Array, rng: jax.Array) -> jax.Array:
    """One index per row of non-negative weights [B, V], drawn with probability weight / row sum. int32 [B].

    Inverts the cumulative distribution at one uniform number per row, by blocks (`_BlockCDF`). That costs one
    pass over the weights, where ``jax.random.categorical`` (Gumbel noise for every logit, then an argmax) costs a
    random number per vocabulary entry: 10x more time on XLA:CPU at 256 x 50,257. Only indices of positive
    weight are ever drawn. Rows need a positive sum.
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
        target = (1.0 - jax.random.uniform(rng, (self.blocks.shape[0],))) * self.total       # in (0, total]
        return self.index_reaching(target).astype(jnp.int32)

    def index_reaching(self, target: jax.Array) -> jax.Array:
        """Per row, the first index whose running sum reaches target [B] (> 0), clamped to the last index of
        positive weight against rounding."""
        block = self.blocks.shape[-1]
        chosen = _first_reaching(self.block_cdf, target, self.block_mass > 0)                   # [B]
        cdf_before_block = jnp.pad(self.block_cdf[:, :-1], ((0, 0), (1, 0)))                    # 0, cdf[0], ...
        mass_before = jnp.take_along_axis(cdf_before_block, chosen[:, None], axis=1)[:, 0]
        inside = jnp.take_along_axis(self.blocks, chosen[:, None, None], axis=1)[:, 0]         # [B, block]
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

    Rejection sampling, where finding the nucleus first (`_top_p_threshold`) costs 32 masked sums per step:
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
        kept = jax.lax.cond(jnp.sum(~done) > few, lambda token, _: in_nucleus(weights, token, mass_to_reach),
                            in_nucleus_if_undecided, candidate, done)
        return round_index + 1, jnp.where(done, token, candidate), done | kept

    start = (jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
    _, token, done = jax.lax.while_loop(lambda c: (c[0] < max_rounds) & ~jnp.all(c[2]), draw_round, start)

    def from_bisected_nucleus(token):
        nucleus = _bisected_nucleus(weights, cdf.total[:, None], top_p)
        return jnp.where(done, token, draw_categorical(nucleus, jax.random.fold_in(rng, max_rounds)))

    return jax.lax.cond(jnp.all(done), lambda token: token, from_bisected_nucleus, token)


def select_tokens(logits: jax.Array, rng: jax.Array, gen_config: GenerationConfig) -> jax.Array:
    """Next token per row [B]: argmax when greedy, else a sample from the processed distribution."""
    if not gen_config.do_sample:
        return argmax_first(logits)
    weights, _ = _shifted_exp(_temperature_top_k(logits, gen_config))
    if gen_config.top_p < 1.0:
        return draw_top_p(weights, gen_config.top_p, rng)
    return draw_categorical(weights, rng)


def argmax_first(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, axis=-1)`` as int32 (the first index of each row's maximum), computed as a max and
    then the smallest index that equals it: two plain reductions, where XLA:CPU's argmax (one reduction carrying
    value and index) took 3x longer at 16 x 50,257, 2 ms of a 65 ms decoding step. Rows holding NaN give an index
    in range (the last) instead of NaN's."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    size = logits.shape[-1]
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.minimum(jnp.min(jnp.where(logits == top, index, size), axis=-1), size - 1)


# ----------------------------------------------------------------------------------------------------------------
# Model calls


@dataclasses.dataclass(frozen=True)
class _Decoder:
    """The model calls generation needs: prefill of the prompt, and one cached decoding step."""

    model: GPT2
    params: Any

    def embed(self, input_ids):
        return self.model.apply({"params": self.params}, input_ids, method=GPT2.embed_tokens)

    def forward(self, embeds, mask, positions, cache):
        """Runs [B, T, D] inputs through the cache; returns (logits of the last position [B, V], new cache)."""
        hidden, cache = self.model.apply({"params": self.params}, inputs_embeds=embeds, attention_mask=mask,
                                         position_ids=positions, cache=cache, return_hidden=True)
        logits = self.model.apply({"params": self.params}, hidden[:, -1], method=GPT2.logits_from_hidden)
        return logits, cache

    def step(self, tokens, mask, positions, cache):
        """One decoding step for tokens [B]; positions [B]."""
        return self.forward(self.embed(tokens[:, None]), mask, positions[:, None], cache)


def _make_decoder(params, config: GPT2Config) -> _Decoder:
    """Prepares the parameters for decoding, once per call, outside the decoding loop: non-float32 compute dtypes
    get their parameters cast here (not at every step), halving the bytes each step reads in bfloat16.

    ``params`` may be `kernels_out_in` parameters, the layout XLA:CPU decodes fastest. Callers convert once per
    set of weights: transposing inside each call would cost more than it saves.
    """
    model, params = bind(params, config)
    if jnp.dtype(config.dtype) != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(config.dtype), params)
    return _Decoder(model=model, params=params)


def _prompt_layout(attention_mask, prefix_len: int, max_new_tokens: int):
    """Cache mask [B, S] and position ids [B, S] for prefix + prompt + new tokens, S = K + P + N.

    The new tokens' slots are marked valid from the start: causality hides them until they are written.
    Position ids are transformers': cumsum(mask) - 1, clipped at 0 (left padding gets position 0, masked anyway).
    """
    batch = attention_mask.shape[0]
    mask = jnp.concatenate([jnp.ones((batch, prefix_len), jnp.int32), attention_mask.astype(jnp.int32),
                            jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return mask, positions


def _prefill(decoder: _Decoder, input_ids, attention_mask, prefix_embeds, max_new_tokens: int):
    """Runs prefix + prompt through a fresh cache. Returns (last logits [B, V], cache, mask [B,S], positions [B,S])."""
    embeds = decoder.embed(input_ids)
    prefix_len = 0
    if prefix_embeds is not None:
        prefix_len = prefix_embeds.shape[1]
        embeds = jnp.concatenate([prefix_embeds.astype(embeds.dtype), embeds], axis=1)
    mask, positions = _prompt_layout(attention_mask, prefix_len, max_new_tokens)
    prompt_len = embeds.shape[1]
    cache = init_cache(decoder.model.config, embeds.shape[0], prompt_len + max_new_tokens)
    logits, cache = decoder.forward(embeds, mask, positions[:, :prompt_len], cache)
    return logits, cache, mask, positions


def _step_positions(positions, cache: KVCache):
    """Position ids [B] of the token about to be written at the cache's next slot."""
    return jax.lax.dynamic_index_in_dim(positions, cache.index, axis=1, keepdims=False)


def _repeat_rows(arrays, times: int):
    """Repeats every row (axis 0) ``times`` times consecutively, like torch.repeat_interleave."""
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0), arrays) if times > 1 else arrays


def _repeat_cache(cache: KVCache, times: int) -> KVCache:
    """The cache with every batch row repeated ``times`` times (prefill once per prompt, decode per copy/beam)."""
    if times == 1:
        return cache
    return cache.map_rows(lambda a: jnp.repeat(a, times, axis=0))


# ----------------------------------------------------------------------------------------------------------------
# Greedy decoding and sampling



class _SampleState(NamedTuple):
    """Loop carry of greedy decoding and sampling (rows = prompts x num_return_sequences)."""

    step: jax.Array  # int32: how many tokens have been chosen
    last_token: jax.Array  # [rows] int32
    tokens: jax.Array  # [rows, N] int32, pad_token_id after EOS and beyond the stopping point
    finished: jax.Array  # [rows] bool: has emitted EOS
    scores: jax.Array  # [rows] float32: sum of the model's log-probabilities of the tokens up to EOS
    cache: KVCache


def _choose_next(state: _SampleState, logits, rng, gen_config: GenerationConfig) -> _SampleState:
    """Chooses token number ``state.step`` for every row; finished rows get pad_token_id (as transformers)."""
    token = select_tokens(logits, jax.random.fold_in(rng, state.step), gen_config)
    token = jnp.where(state.finished, jnp.int32(gen_config.pad_token_id), token)
    scores = state.scores + jnp.where(state.finished, 0.0, _log_probs(logits, token))
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, axis=1)
    finished = state.finished
    if gen_config.eos_token_id is not None:
        finished = finished | (token == gen_config.eos_token_id)
    return state._replace(step=state.step + 1, last_token=token, tokens=tokens, finished=finished, scores=scores)


class Prefilled(NamedTuple):
    """Prompts run through the model, ready for decoding: what :func:`prefill` returns. Rows can be gathered
    (``gather_prefilled``): a prompt shared by many rows (a class prompt) is prefilled once."""

    logits: jax.Array  # [R, V] float32: next-token logits after the prompt
    cache: KVCache  # k, v: per layer [R, H, S, Dh], S = prefix + prompt + max_new_tokens slots
    mask: jax.Array  # [R, S] int32: valid cache slots (prompt padding is 0)
    positions: jax.Array  # [R, S] int32: position ids of the slots


def prefill(params, model_config: GPT2Config, input_ids, attention_mask, max_new_tokens: int, *,
            prefix_embeds=None) -> Prefilled:
    """Runs left-padded prompts (and an optional prefix) through a fresh cache with room for max_new_tokens."""
    decoder = _make_decoder(params, model_config)
    return Prefilled(*_prefill(decoder, input_ids, attention_mask, prefix_embeds, max_new_tokens))


def gather_prefilled(prefilled: Prefilled, rows: jax.Array) -> Prefilled:
    """The prefilled rows ``rows`` [R'] (int indices, repeats allowed), in that order."""
    return Prefilled(logits=prefilled.logits[rows], mask=prefilled.mask[rows], positions=prefilled.positions[rows],
                     cache=prefilled.cache.map_rows(lambda a: jnp.take(a, rows, axis=0)))


def sample_tokens(params, model_config: GPT2Config, input_ids, attention_mask, rng, gen_config: GenerationConfig,
                  *, prefix_embeds=None):
    """Greedy decoding or sampling. Same arguments and results as :func:`generate_tokens` (num_beams ignored)."""
    _check_traced_inputs(model_config, input_ids, attention_mask, gen_config, prefix_embeds)
    prompts = prefill(params, model_config, input_ids, attention_mask, gen_config.max_new_tokens,
                      prefix_embeds=prefix_embeds)
    return sample_after_prefill(params, model_config, prompts, rng, gen_config)


def sample_after_prefill(params, model_config: GPT2Config, prompts: Prefilled, rng, gen_config: GenerationConfig):
    """Greedy decoding or sampling from prefilled prompts: num_return_sequences rows per prompt, as
    :func:`generate_tokens` returns them. The random draws depend only on rng and the row count, so prefilling
    shared prompts once and gathering them (``gather_prefilled``) gives the same tokens as prefilling every row."""
    copies, max_new = gen_config.num_return_sequences, gen_config.max_new_tokens
    rows = prompts.logits.shape[0] * copies
    decoder = _make_decoder(params, model_config)
    logits, mask, positions = _repeat_rows((prompts.logits, prompts.mask, prompts.positions), copies)
    cache = _repeat_cache(prompts.cache, copies)
    state = _SampleState(
        step=jnp.zeros((), jnp.int32), last_token=jnp.zeros((rows,), jnp.int32),
        tokens=jnp.full((rows, max_new), gen_config.pad_token_id, jnp.int32),
        finished=jnp.zeros((rows,), bool), scores=jnp.zeros((rows,), jnp.float32), cache=cache)
    state = _choose_next(state, logits, rng, gen_config)

    def keep_going(state):
        return (state.step < max_new) & ~jnp.all(state.finished)

    def decode_one(state):
        logits, cache = decoder.step(state.last_token, mask, _step_positions(positions, state.cache), state.cache)
        return _choose_next(state._replace(cache=cache), logits, rng, gen_config)

    state = jax.lax.while_loop(keep_going, decode_one, state)
    return state.tokens, state.scores


# ----------------------------------------------------------------------------------------------------------------
# Beam search (transformers' vectorised beam search, step for step)


class _BeamState(NamedTuple):
    """Loop carry of beam search; names follow transformers' ``_beam_search``. Shapes: B prompts, nb beams."""

    step: jax.Array  # int32: tokens generated so far (transformers' cur_len - decoder_prompt_len)
    running_tokens: jax.Array  # [B, nb, N] int32: live hypotheses
    running_scores: jax.Array  # [B, nb] float32: their summed log-probabilities
    parents: jax.Array  # [B * nb] int32: flat row each live beam continues (to reorder the cache)
    tokens: jax.Array  # [B, nb, N] int32: best finished hypotheses
    scores: jax.Array  # [B, nb] float32: their length-penalised scores (-1e9 while empty)
    finished: jax.Array  # [B, nb] bool: transformers' is_sent_finished
    improvable: jax.Array  # [B, 1] bool: transformers' is_early_stop_heuristic_unsatisfied
    keep_going: jax.Array  # bool: transformers' _beam_search_has_unfinished_sequences
    cache: KVCache


def _length_penalty_divisors(gen_config: GenerationConfig) -> jax.Array:
    """[N + 1] float32: n ** length_penalty for n = 0..N, computed in double precision like transformers' Python
    scalar and rounded to float32, so that scores match transformers bit for bit."""
    lengths = np.arange(gen_config.max_new_tokens + 1, dtype=np.float64)
    return jnp.asarray((lengths ** gen_config.length_penalty).astype(np.float32))


def _gather_beams(x, beam_indices):
    """x [B, K, ...] -> x[b, beam_indices[b, j], ...] for beam_indices [B, J]."""
    index = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _top_candidates(accumulated, rng, count: int, do_sample: bool):
    """The ``count`` best (or, when sampling, sampled without replacement) continuations, best first."""
    if not do_sample:
        return jax.lax.top_k(accumulated, count)
    # Gumbel top-k samples without replacement from softmax(accumulated), as transformers' torch.multinomial.
    _, indices = jax.lax.top_k(accumulated + jax.random.gumbel(rng, accumulated.shape), count)
    values = jnp.take_along_axis(accumulated, indices, axis=-1)
    order = jnp.argsort(values, axis=-1, descending=True, stable=True)
    return jnp.take_along_axis(values, order, axis=-1), jnp.take_along_axis(indices, order, axis=-1)


def _beam_step(state: _BeamState, logits, rng, gen_config: GenerationConfig, divisors) -> _BeamState:
    """One step of transformers' beam search: choose 2 * nb candidates, keep nb live ones, update finished ones."""
    batch, num_beams, max_new = state.running_tokens.shape
    vocab = logits.shape[-1]
    step = state.step
    neg = jnp.float32(_BEAM_NEG)

    log_probs = process_logits(jax.nn.log_softmax(logits, axis=-1), gen_config).reshape(batch, num_beams, vocab)
    accumulated = (log_probs + state.running_scores[:, :, None]).reshape(batch, num_beams * vocab)
    num_candidates = 2 * num_beams
    cand_scores, cand_index = _top_candidates(accumulated, jax.random.fold_in(rng, step), num_candidates,
                                              gen_config.do_sample)
    cand_beam, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
    cand_tokens = _gather_beams(state.running_tokens, cand_beam)
    cand_tokens = jax.lax.dynamic_update_slice_in_dim(cand_tokens, cand_token[:, :, None], step, axis=2)
    hits_stop = jnp.broadcast_to(step + 1 >= max_new, cand_token.shape)
    if gen_config.eos_token_id is not None:
        hits_stop = hits_stop | (cand_token == gen_config.eos_token_id)

    # Live beams for the next step: the best candidates that did not stop.
    live_scores = cand_scores + hits_stop.astype(jnp.float32) * neg
    keep = jax.lax.top_k(live_scores, num_beams)[1]
    running_tokens = _gather_beams(cand_tokens, keep)
    running_scores = _gather_beams(live_scores, keep)
    parents = (_gather_beams(cand_beam, keep) + jnp.arange(batch)[:, None] * num_beams).reshape(-1)

    # Finished hypotheses: merge the candidates among the top nb that just stopped, if they score better.
    early_stopping = gen_config.early_stopping
    just_finished = hits_stop & (jnp.arange(num_candidates) < num_beams)[None, :]
    final_scores = cand_scores / divisors[step + 1]
    beams_full = jnp.all(state.finished, axis=-1, keepdims=True) & (early_stopping is True)
    final_scores = final_scores + beams_full.astype(jnp.float32) * neg
    final_scores = final_scores + (~state.improvable).astype(jnp.float32) * neg
    final_scores = final_scores + (~just_finished).astype(jnp.float32) * neg
    merged_scores = jnp.concatenate([state.scores, final_scores], axis=1)
    best = jax.lax.top_k(merged_scores, num_beams)[1]
    tokens = _gather_beams(jnp.concatenate([state.tokens, cand_tokens], axis=1), best)
    scores = _gather_beams(merged_scores, best)
    finished = _gather_beams(jnp.concatenate([state.finished, just_finished], axis=1), best)

    # Can a live beam still beat the worst finished one? (transformers' _check_early_stop_heuristic)
    if early_stopping == "never" and gen_config.length_penalty > 0.0:
        best_length = max_new
    else:
        best_length = step + 1
    best_possible = running_scores[:, :1] / divisors[best_length]
    worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), neg)
    improvable = state.improvable & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
    keep_going = (jnp.any(improvable) & ~(jnp.all(finished) & (early_stopping is True))
                  & ~jnp.all(hits_stop))
    return state._replace(step=step + 1, running_tokens=running_tokens, running_scores=running_scores,
                          parents=parents, tokens=tokens, scores=scores, finished=finished, improvable=improvable,
                          keep_going=keep_going)


def beam_search_tokens(params, model_config: GPT2Config, input_ids, attention_mask, rng,
                       gen_config: GenerationConfig, *, prefix_embeds=None):
    """Beam search with gen_config.num_beams beams (also 1). Same arguments and results as :func:`generate_tokens`:
    the num_return_sequences best finished hypotheses per prompt, best first, and their scores."""
    _check_traced_inputs(model_config, input_ids, attention_mask, gen_config, prefix_embeds)
    batch, num_beams, max_new = input_ids.shape[0], gen_config.num_beams, gen_config.max_new_tokens
    rows = batch * num_beams
    decoder = _make_decoder(params, model_config)
    logits, cache, mask, positions = _prefill(decoder, input_ids, attention_mask, prefix_embeds, max_new)
    logits, mask, positions = _repeat_rows((logits, mask, positions), num_beams)
    cache = _repeat_cache(cache, num_beams)
    divisors = _length_penalty_divisors(gen_config)
    empty = jnp.full((batch, num_beams, max_new), gen_config.pad_token_id, jnp.int32)
    state = _BeamState(
        step=jnp.zeros((), jnp.int32), running_tokens=empty,
        running_scores=jnp.zeros((batch, num_beams), jnp.float32).at[:, 1:].set(_BEAM_NEG),
        parents=jnp.arange(rows, dtype=jnp.int32), tokens=empty,
        scores=jnp.full((batch, num_beams), _BEAM_NEG, jnp.float32), finished=jnp.zeros((batch, num_beams), bool),
        improvable=jnp.ones((batch, 1), bool), keep_going=jnp.ones((), bool), cache=cache)
    state = _beam_step(state, logits, rng, gen_config, divisors)

    def decode_one(state):
        cache = state.cache.map_rows(lambda a: jnp.take(a, state.parents, axis=0))
        last = jax.lax.dynamic_index_in_dim(state.running_tokens, state.step - 1, axis=2, keepdims=False)
        logits, cache = decoder.step(last.reshape(rows), mask, _step_positions(positions, cache), cache)
        return _beam_step(state._replace(cache=cache), logits, rng, gen_config, divisors)

    state = jax.lax.while_loop(lambda s: s.keep_going & (s.step < max_new), decode_one, state)
    copies = gen_config.num_return_sequences
    return state.tokens[:, :copies].reshape(batch * copies, max_new), state.scores[:, :copies].reshape(-1)


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


def generate_tokens(params, model_config: GPT2Config, input_ids, attention_mask, rng, gen_config: GenerationConfig,
                    *, prefix_embeds=None):
    """Generates up to gen_config.max_new_tokens tokens after each left-padded prompt. Pure and jit-traceable.

    Args:
      params: GPT-2 parameters (``GPT2(model_config).init(...)["params"]`` or ``imgllm.language.hf.load_gpt2``).
      model_config: the model's sizes and compute dtype (static).
      input_ids: [B, P] int prompts, left-padded; attention_mask: [B, P], 1 for real tokens.
      rng: a PRNG key (used only when sampling; results are a function of it).
      gen_config: decoding settings (static).
      prefix_embeds: optional [B, K, D] embeddings placed before the prompt (a visual prefix).

    Returns:
      tokens [B * num_return_sequences, max_new_tokens] int32 (rows of one prompt are consecutive; pad_token_id
      after EOS), and scores [B * num_return_sequences] float32: for beam search transformers' sequence score
      (sum of log-probabilities / generated_length ** length_penalty); otherwise the sum of the model's
      log-probabilities of the generated tokens up to and including EOS.
    """
    if gen_config.num_beams > 1:
        return beam_search_tokens(params, model_config, input_ids, attention_mask, rng, gen_config,
                                  prefix_embeds=prefix_embeds)
    return sample_tokens(params, model_config, input_ids, attention_mask, rng, gen_config,
                         prefix_embeds=prefix_embeds)


def _check_traced_inputs(model_config: GPT2Config, input_ids, attention_mask, gen_config, prefix_embeds):
    """Shape checks that work on tracers (they run once, at trace time, before any compile)."""
    gen_config.check_vocab(model_config.vocab_size)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, prompt_length], got shape {input_ids.shape}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids {input_ids.shape}")
    prefix_len = 0
    if prefix_embeds is not None:
        expected = (input_ids.shape[0], prefix_embeds.shape[1], model_config.n_embd)
        if prefix_embeds.ndim != 3 or prefix_embeds.shape != expected:
            raise ValueError(f"prefix_embeds must be [batch, prefix_length, n_embd] = [{expected[0]}, K, "
                             f"{expected[2]}], got shape {prefix_embeds.shape}")
        prefix_len = prefix_embeds.shape[1]
    total = prefix_len + input_ids.shape[1] + gen_config.max_new_tokens
    if total > model_config.n_positions:
        raise ValueError(f"prefix ({prefix_len}) + prompt ({input_ids.shape[1]}) + max_new_tokens "
                         f"({gen_config.max_new_tokens}) = {total} exceeds n_positions={model_config.n_positions}")


_generate_jit = jax.jit(generate_tokens, static_argnames=("model_config", "gen_config"))


def bucket_prompts(input_ids, attention_mask, length_bucket: int, pad_token_id: int):
    """Left-pads (or trims all-padding columns of) host prompts to the next multiple of ``length_bucket`` that
    holds the longest prompt, so that calls with similar prompt lengths share one compiled program."""
    longest = max(int(attention_mask.sum(axis=1).max()), 1)
    length = -(-longest // length_bucket) * length_bucket
    ids, mask = input_ids[:, -longest:], attention_mask[:, -longest:]
    pad = length - longest
    ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_token_id)
    return ids.astype(np.int32), np.pad(mask, ((0, 0), (pad, 0))).astype(np.int32)


def _check_host_prompts(input_ids, attention_mask, model_config: GPT2Config):
    """Value checks on host prompts, with the offending row, before anything is compiled."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be "
                         f"[batch, prompt_length]")
    bad = np.argwhere((input_ids < 0) | (input_ids >= model_config.vocab_size))
    if len(bad):
        row, col = bad[0]
        raise ValueError(f"input_ids[{row}, {col}]={input_ids[row, col]} is outside the vocabulary "
                         f"[0, {model_config.vocab_size})")
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("attention_mask must contain only 0 and 1")
    not_left_padded = np.flatnonzero((np.diff(attention_mask.astype(np.int8), axis=1) < 0).any(axis=1))
    if len(not_left_padded):
        raise ValueError(f"prompt {not_left_padded[0]} is not left-padded (a 0 follows a 1 in its attention_mask); "
                         f"use a tokenizer with padding_side='left'")


def generate(params, model_config: GPT2Config, input_ids, attention_mask=None, rng=None,
             gen_config: GenerationConfig | None = None, *, prefix_embeds=None, mesh: Mesh | None = None,
             length_bucket: int = 16):
    """Host-friendly, data-parallel :func:`generate_tokens`: returns numpy (tokens, scores) for numpy prompts.

    Prompt lengths are bucketed to multiples of ``length_bucket`` (left padding) and the batch is padded to a
    multiple of the mesh's 'data' axis and sharded over it, so calls with the same batch size, bucket and configs
    reuse one compiled program. ``rng`` may be omitted for greedy and beam search.

    On CPU, pass ``imgllm.language.gpt2.kernels_out_in(params)`` (made once) for repeated calls: the same results,
    10-30% faster decoding.
    """
    gen_config = gen_config or GenerationConfig(max_new_tokens=32, eos_token_id=model_config.eos_token_id,
                                                pad_token_id=model_config.eos_token_id)
    input_ids = np.asarray(input_ids)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    _check_host_prompts(input_ids, attention_mask, model_config)
    if rng is None:
        if gen_config.do_sample:
            raise ValueError("sampling (do_sample=True) needs an explicit rng key")
        rng = jax.random.key(0)
    ids, mask = bucket_prompts(input_ids, attention_mask, length_bucket, gen_config.pad_token_id)
    from imgllm import parallel

    mesh = mesh or parallel.make_mesh()
    batch = ids.shape[0]
    extra = -batch % parallel.global_batch_divisor(mesh)  # filler rows (copies of row 0), dropped from the result
    rows = np.concatenate([np.arange(batch), np.zeros(extra, np.int64)])
    batch_sharding = parallel.data_sharding(mesh)
    ids, mask = (jax.device_put(x[rows], batch_sharding) for x in (ids, mask))
    if prefix_embeds is not None:
        prefix_embeds = jax.device_put(np.asarray(prefix_embeds)[rows], batch_sharding)
    params = jax.device_put(params, parallel.replicated_sharding(mesh))
    tokens, scores = _generate_jit(params, model_config, ids, mask, rng, gen_config, prefix_embeds=prefix_embeds)
    keep = batch * gen_config.num_return_sequences
    return np.asarray(tokens)[:keep], np.asarray(scores)[:keep]
