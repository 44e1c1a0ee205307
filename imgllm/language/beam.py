"""Beam search, transformers' vectorised beam search step by step, over any cached decoding step.

Top 2 * num_beams candidates per prompt, length penalty ``score / generated_length ** length_penalty``, the
``early_stopping`` heuristic and the same "very low score" constant, so that beam results are token-identical to
transformers up to floating point near-ties (tests/test_parity.py). `imgllm.language.decoding.beam_search_tokens`
runs it on any LM after prefilling the prompts; this module knows nothing of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from imgllm.language.cache import KVCache
from imgllm.language.sampling import process_logits

# transformers' "very low score" for finished / impossible beams (kept identical so that ties resolve alike).
_BEAM_NEG = -1.0e9


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


def _length_penalty_divisors(gen_config) -> jax.Array:
    """[N + 1] float32: n ** length_penalty for n = 0..N, computed in double precision like transformers' Python
    scalar and rounded to float32, so that scores match transformers bit for bit."""
    lengths = np.arange(gen_config.max_new_tokens + 1, dtype=np.float64)
    return jnp.asarray((lengths**gen_config.length_penalty).astype(np.float32))


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


def _beam_step(state: _BeamState, logits, rng, gen_config, divisors) -> _BeamState:
    """One step of transformers' beam search: choose 2 * nb candidates, keep nb live ones, update finished ones."""
    batch, num_beams, max_new = state.running_tokens.shape
    vocab = logits.shape[-1]
    step = state.step
    neg = jnp.float32(_BEAM_NEG)

    log_probs = process_logits(jax.nn.log_softmax(logits, axis=-1), gen_config).reshape(batch, num_beams, vocab)
    accumulated = (log_probs + state.running_scores[:, :, None]).reshape(batch, num_beams * vocab)
    num_candidates = 2 * num_beams
    cand_scores, cand_index = _top_candidates(
        accumulated, jax.random.fold_in(rng, step), num_candidates, gen_config.do_sample
    )
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
    keep_going = jnp.any(improvable) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits_stop)
    return state._replace(
        step=step + 1,
        running_tokens=running_tokens,
        running_scores=running_scores,
        parents=parents,
        tokens=tokens,
        scores=scores,
        finished=finished,
        improvable=improvable,
        keep_going=keep_going,
    )


def beam_search(step: Callable, logits: jax.Array, cache: KVCache, rng: jax.Array, gen_config):
    """The gen_config.num_return_sequences best finished hypotheses per prompt, best first, and their scores.

    Args:
      step: one cached decoding step, ``step(tokens [R], cache) -> (next-token logits [R, V], cache)``.
      logits: [R, V] next-token logits after the prompts, R = prompts x num_beams (each prompt's row repeated
        num_beams times, consecutively); cache: the prompts' cache with the same rows.
      rng: used only when sampling (``gen_config.do_sample``).
      gen_config: a `imgllm.language.decoding.GenerationConfig` with num_beams >= 1.

    Returns:
      tokens [prompts * num_return_sequences, max_new_tokens] int32 (pad_token_id after EOS) and scores
      [prompts * num_return_sequences] float32: sum of log-probabilities / generated_length ** length_penalty.
    """
    num_beams, max_new = gen_config.num_beams, gen_config.max_new_tokens
    rows = logits.shape[0]
    batch = rows // num_beams
    divisors = _length_penalty_divisors(gen_config)
    empty = jnp.full((batch, num_beams, max_new), gen_config.pad_token_id, jnp.int32)
    state = _BeamState(
        step=jnp.zeros((), jnp.int32),
        running_tokens=empty,
        running_scores=jnp.zeros((batch, num_beams), jnp.float32).at[:, 1:].set(_BEAM_NEG),
        parents=jnp.arange(rows, dtype=jnp.int32),
        tokens=empty,
        scores=jnp.full((batch, num_beams), _BEAM_NEG, jnp.float32),
        finished=jnp.zeros((batch, num_beams), bool),
        improvable=jnp.ones((batch, 1), bool),
        keep_going=jnp.ones((), bool),
        cache=cache,
    )
    state = _beam_step(state, logits, rng, gen_config, divisors)

    def decode_one(state):
        cache = state.cache.map_rows(lambda a: jnp.take(a, state.parents, axis=0))
        last = jax.lax.dynamic_index_in_dim(state.running_tokens, state.step - 1, axis=2, keepdims=False)
        logits, cache = step(last.reshape(rows), cache)
        return _beam_step(state._replace(cache=cache), logits, rng, gen_config, divisors)

    state = jax.lax.while_loop(lambda s: s.keep_going & (s.step < max_new), decode_one, state)
    copies = gen_config.num_return_sequences
    return state.tokens[:, :copies].reshape(batch * copies, max_new), state.scores[:, :copies].reshape(-1)
