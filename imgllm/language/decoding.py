"""Text generation with a KV cache: prefill and cached decoding in one jit-compiled function.

Read top to bottom: `GenerationConfig` (how to decode), the model calls (`prefill` runs the prompts through a
fresh cache), the decoding loop (`sample_after_prefill`: greedy or sampling, one token per step, choosing tokens
with `imgllm.language.sampling`), beam search (`imgllm.language.beam`), then the entry points.

``generate_tokens`` is pure and traceable (fixed shapes, ``lax.while_loop``, randomness from an explicit key, static
hashable configs), so larger jitted functions (the image -> caption pipeline) call it directly, and it runs under
``jax.pmap`` as under ``jax.jit``. ``generate`` is the convenience entry point for host data: it validates the
inputs, buckets prompt lengths (left padding) so that calls with similar prompt lengths reuse one compiled program,
and shards the batch over the device mesh's ``'data'`` axis.

Semantics follow Hugging Face ``transformers`` ``generate`` for left-padded batches: position ids are
``cumsum(attention_mask) - 1`` clipped at 0, finished rows emit ``pad_token_id`` after their EOS, and beam search
reproduces transformers' vectorised beam search step by step, so greedy and beam results are token-identical to
transformers up to floating point near-ties.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from imgllm import parallel
from imgllm.language import model as lm
from imgllm.language.beam import beam_search
from imgllm.language.cache import KVCache, init_cache
from imgllm.language.sampling import resolve_sampler, select_tokens, token_log_probs


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How to decode (names and meanings as in transformers' ``GenerationConfig``). Frozen: a static jit argument.

    Greedy when ``do_sample`` is False and ``num_beams`` is 1; sampling applies temperature, then top-k
    (0 = off), then top-p (1.0 = off). Beam search when ``num_beams`` > 1 (with sampling if ``do_sample``).
    ``eos_token_id`` None disables stopping at EOS. ``early_stopping``: False (transformers' default heuristic),
    True (stop a prompt once num_beams hypotheses are finished) or "never".

    ``sampler`` picks how tokens are selected (`imgllm.language.sampling`): "plain" (sort + cumsum nucleus,
    ``jax.random.categorical``; what GPU/TPU run) or "cpu" (`imgllm.language.sampling_cpu`, the same
    distributions computed the way XLA:CPU runs fast). The default "auto" stays "auto": the program chooses when it
    is lowered, per platform ("cpu" on CPU, "plain" elsewhere), not from the host that made the config.
    Greedy and beam tokens are the same either way; sampled tokens differ (the same distribution, other draws).
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
    sampler: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "sampler", resolve_sampler(self.sampler))
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
            raise ValueError(
                f"GenerationConfig.early_stopping must be False, True or 'never', got {self.early_stopping!r}"
            )
        if self.num_return_sequences < 1:
            raise ValueError(f"GenerationConfig.num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(
                f"GenerationConfig.num_return_sequences={self.num_return_sequences} exceeds num_beams={self.num_beams}"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError(
                "GenerationConfig.num_return_sequences > 1 needs do_sample=True or num_beams > 1 "
                "(greedy decoding would return identical copies)"
            )

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError if a token id of this config is outside the model's vocabulary."""
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"GenerationConfig.{name}={value} is outside the vocabulary [0, {vocab_size})")
        if self.top_k > vocab_size:
            raise ValueError(f"GenerationConfig.top_k={self.top_k} exceeds the vocabulary size {vocab_size}")


# ----------------------------------------------------------------------------------------------------------------
# Model calls: prefill the prompts, then one cached step at a time


@dataclasses.dataclass(frozen=True)
class _Decoder:
    """The model calls generation needs: prefill of the prompt, and one cached decoding step."""

    config: lm.LMConfig
    params: Any

    def embed(self, input_ids):
        return lm.embed_tokens(self.params, self.config, input_ids)

    def forward(self, embeds, mask, positions, cache):
        """Runs [B, T, D] inputs through the cache; returns (logits of the last position [B, V], new cache)."""
        hidden, cache = lm.hidden_states(
            self.params, self.config, embeds, attention_mask=mask, position_ids=positions, cache=cache
        )
        # Only the last position's logits are needed: the head runs on it alone.
        return lm.logits_from_hidden(self.params, self.config, hidden[:, -1]), cache

    def step(self, tokens, mask, positions, cache):
        """One decoding step for tokens [B]; positions [B]."""
        return self.forward(self.embed(tokens[:, None]), mask, positions[:, None], cache)


def _make_decoder(params, config: lm.LMConfig) -> _Decoder:
    """Prepares the parameters for decoding, once per call, outside the decoding loop: non-float32 compute dtypes
    get their parameters cast here (not at every step), halving the bytes each step reads in bfloat16.

    ``params`` may be `imgllm.language.matmul_cpu.kernels_out_in` parameters, XLA:CPU's fast layout. Callers
    convert once per set of weights: transposing inside each call would cost more than it saves.
    """
    if jnp.dtype(config.dtype) != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(config.dtype), params)
    return _Decoder(config=config, params=params)


def _prompt_layout(attention_mask, prefix_len: int, max_new_tokens: int):
    """Cache mask [B, S] and position ids [B, S] for prefix + prompt + new tokens, S = K + P + N.

    The new tokens' slots are marked valid from the start: causality hides them until they are written.
    Position ids are transformers': cumsum(mask) - 1, clipped at 0 (left padding gets position 0, masked anyway).
    """
    batch = attention_mask.shape[0]
    mask = jnp.concatenate(
        [
            jnp.ones((batch, prefix_len), jnp.int32),
            attention_mask.astype(jnp.int32),
            jnp.ones((batch, max_new_tokens), jnp.int32),
        ],
        axis=1,
    )
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return mask, positions


class Prefilled(NamedTuple):
    """Prompts run through the model, ready for decoding: what :func:`prefill` returns. Rows can be gathered
    (``gather_prefilled``): a prompt shared by many rows (a class prompt) is prefilled once."""

    logits: jax.Array  # [R, V] float32: next-token logits after the prompt
    cache: KVCache  # k, v: per layer [R, H, S, Dh], S = prefix + prompt + max_new_tokens slots
    mask: jax.Array  # [R, S] int32: valid cache slots (prompt padding is 0)
    positions: jax.Array  # [R, S] int32: position ids of the slots

    def repeat_rows(self, times: int) -> Prefilled:
        """Every row repeated ``times`` times consecutively (like torch.repeat_interleave): prefill once per
        prompt, decode once per returned sequence or beam."""
        if times == 1:
            return self
        repeat = lambda x: jnp.repeat(x, times, axis=0)  # noqa: E731
        return Prefilled(
            logits=repeat(self.logits),
            cache=self.cache.map_rows(repeat),
            mask=repeat(self.mask),
            positions=repeat(self.positions),
        )


def prefill(
    params, model_config: lm.LMConfig, input_ids, attention_mask, max_new_tokens: int, *, prefix_embeds=None
) -> Prefilled:
    """Runs left-padded prompts (and an optional prefix [B, K, D]) through a fresh cache with room for
    max_new_tokens."""
    decoder = _make_decoder(params, model_config)
    embeds = decoder.embed(input_ids)
    prefix_len = 0
    if prefix_embeds is not None:
        prefix_len = prefix_embeds.shape[1]
        embeds = jnp.concatenate([prefix_embeds.astype(embeds.dtype), embeds], axis=1)
    mask, positions = _prompt_layout(attention_mask, prefix_len, max_new_tokens)
    prompt_len = embeds.shape[1]
    cache = init_cache(decoder.config, embeds.shape[0], prompt_len + max_new_tokens)
    logits, cache = decoder.forward(embeds, mask, positions[:, :prompt_len], cache)
    return Prefilled(logits=logits, cache=cache, mask=mask, positions=positions)


def gather_prefilled(prefilled: Prefilled, rows: jax.Array) -> Prefilled:
    """The prefilled rows ``rows`` [R'] (int indices, repeats allowed), in that order."""
    return Prefilled(
        logits=prefilled.logits[rows],
        mask=prefilled.mask[rows],
        positions=prefilled.positions[rows],
        cache=prefilled.cache.map_rows(lambda a: jnp.take(a, rows, axis=0)),
    )


def _decoding_step(decoder: _Decoder, prompts: Prefilled) -> Callable:
    """``step(tokens [R], cache) -> (logits [R, V], cache)``: one cached step after ``prompts`` (their mask and
    position ids), writing the tokens at the cache's next slot."""

    def step(tokens, cache):
        positions = jax.lax.dynamic_index_in_dim(prompts.positions, cache.index, axis=1, keepdims=False)
        return decoder.step(tokens, prompts.mask, positions, cache)

    return step


# ----------------------------------------------------------------------------------------------------------------
# The decoding loop: greedy decoding and sampling


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
    scores = state.scores + jnp.where(state.finished, 0.0, token_log_probs(logits, token))
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, axis=1)
    finished = state.finished
    if gen_config.eos_token_id is not None:
        finished = finished | (token == gen_config.eos_token_id)
    return state._replace(step=state.step + 1, last_token=token, tokens=tokens, finished=finished, scores=scores)


def sample_after_prefill(params, model_config: lm.LMConfig, prompts: Prefilled, rng, gen_config: GenerationConfig):
    """Greedy decoding or sampling from prefilled prompts: num_return_sequences rows per prompt, as
    :func:`generate_tokens` returns them. The random draws depend only on rng and the row count, so prefilling
    shared prompts once and gathering them (``gather_prefilled``) gives the same tokens as prefilling every row."""
    copies, max_new = gen_config.num_return_sequences, gen_config.max_new_tokens
    rows = prompts.logits.shape[0] * copies
    prompts = prompts.repeat_rows(copies)
    step = _decoding_step(_make_decoder(params, model_config), prompts)
    state = _SampleState(
        step=jnp.zeros((), jnp.int32),
        last_token=jnp.zeros((rows,), jnp.int32),
        tokens=jnp.full((rows, max_new), gen_config.pad_token_id, jnp.int32),
        finished=jnp.zeros((rows,), bool),
        scores=jnp.zeros((rows,), jnp.float32),
        cache=prompts.cache,
    )
    state = _choose_next(state, prompts.logits, rng, gen_config)

    def keep_going(state):
        return (state.step < max_new) & ~jnp.all(state.finished)

    def decode_one(state):
        logits, cache = step(state.last_token, state.cache)
        return _choose_next(state._replace(cache=cache), logits, rng, gen_config)

    state = jax.lax.while_loop(keep_going, decode_one, state)
    return state.tokens, state.scores


def sample_tokens(
    params,
    model_config: lm.LMConfig,
    input_ids,
    attention_mask,
    rng,
    gen_config: GenerationConfig,
    *,
    prefix_embeds=None,
):
    """Greedy decoding or sampling. Same arguments and results as :func:`generate_tokens` (num_beams ignored)."""
    _check_traced_inputs(model_config, input_ids, attention_mask, gen_config, prefix_embeds)
    prompts = prefill(
        params, model_config, input_ids, attention_mask, gen_config.max_new_tokens, prefix_embeds=prefix_embeds
    )
    return sample_after_prefill(params, model_config, prompts, rng, gen_config)


def beam_search_tokens(
    params,
    model_config: lm.LMConfig,
    input_ids,
    attention_mask,
    rng,
    gen_config: GenerationConfig,
    *,
    prefix_embeds=None,
):
    """Beam search with gen_config.num_beams beams (also 1). Same arguments and results as :func:`generate_tokens`:
    the num_return_sequences best finished hypotheses per prompt, best first, and their scores
    (`imgllm.language.beam.beam_search`)."""
    _check_traced_inputs(model_config, input_ids, attention_mask, gen_config, prefix_embeds)
    prompts = prefill(
        params, model_config, input_ids, attention_mask, gen_config.max_new_tokens, prefix_embeds=prefix_embeds
    ).repeat_rows(gen_config.num_beams)
    step = _decoding_step(_make_decoder(params, model_config), prompts)
    return beam_search(step, prompts.logits, prompts.cache, rng, gen_config)


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def generate_tokens(
    params,
    model_config: lm.LMConfig,
    input_ids,
    attention_mask,
    rng,
    gen_config: GenerationConfig,
    *,
    prefix_embeds=None,
):
    """Generates up to gen_config.max_new_tokens tokens after each left-padded prompt. Pure and jit-traceable.

    Args:
      params: the LM's parameters (`imgllm.language.model.init_params`, or loaded: `imgllm.language.load`),
        or the same converted by `imgllm.language.matmul_cpu.kernels_out_in` (XLA:CPU's fast layout).
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
        return beam_search_tokens(
            params, model_config, input_ids, attention_mask, rng, gen_config, prefix_embeds=prefix_embeds
        )
    return sample_tokens(params, model_config, input_ids, attention_mask, rng, gen_config, prefix_embeds=prefix_embeds)


def _check_traced_inputs(model_config: lm.LMConfig, input_ids, attention_mask, gen_config, prefix_embeds):
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
            raise ValueError(
                f"prefix_embeds must be [batch, prefix_length, n_embd] = [{expected[0]}, K, "
                f"{expected[2]}], got shape {prefix_embeds.shape}"
            )
        prefix_len = prefix_embeds.shape[1]
    total = prefix_len + input_ids.shape[1] + gen_config.max_new_tokens
    if total > model_config.n_positions:
        raise ValueError(
            f"prefix ({prefix_len}) + prompt ({input_ids.shape[1]}) + max_new_tokens "
            f"({gen_config.max_new_tokens}) = {total} exceeds n_positions={model_config.n_positions}"
        )


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


def _check_host_prompts(input_ids, attention_mask, model_config: lm.LMConfig):
    """Value checks on host prompts, with the offending row, before anything is compiled."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be [batch, prompt_length]"
        )
    bad = np.argwhere((input_ids < 0) | (input_ids >= model_config.vocab_size))
    if len(bad):
        row, col = bad[0]
        raise ValueError(
            f"input_ids[{row}, {col}]={input_ids[row, col]} is outside the vocabulary [0, {model_config.vocab_size})"
        )
    if not np.isin(attention_mask, (0, 1)).all():
        raise ValueError("attention_mask must contain only 0 and 1")
    not_left_padded = np.flatnonzero((np.diff(attention_mask.astype(np.int8), axis=1) < 0).any(axis=1))
    if len(not_left_padded):
        raise ValueError(
            f"prompt {not_left_padded[0]} is not left-padded (a 0 follows a 1 in its attention_mask); "
            f"use a tokenizer with padding_side='left'"
        )


def generate(
    params,
    model_config: lm.LMConfig,
    input_ids,
    attention_mask=None,
    rng=None,
    gen_config: GenerationConfig | None = None,
    *,
    prefix_embeds=None,
    mesh: Mesh | None = None,
    length_bucket: int = 16,
):
    """Host-friendly, data-parallel :func:`generate_tokens`: returns numpy (tokens, scores) for numpy prompts.

    Prompt lengths are bucketed to multiples of ``length_bucket`` (left padding) and the batch is padded to a
    multiple of the mesh's 'data' axis and sharded over it, so calls with the same batch size, bucket and configs
    reuse one compiled program. ``rng`` may be omitted for greedy and beam search.

    On CPU, pass ``imgllm.language.matmul_cpu.kernels_out_in(params)`` (made once) for repeated calls: the same
    results, decoded faster.
    """
    gen_config = gen_config or GenerationConfig(
        max_new_tokens=32, eos_token_id=model_config.eos_token_id, pad_token_id=model_config.eos_token_id
    )
    input_ids = np.asarray(input_ids)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    _check_host_prompts(input_ids, attention_mask, model_config)
    if rng is None:
        if gen_config.do_sample:
            raise ValueError("sampling (do_sample=True) needs an explicit rng key")
        rng = jax.random.key(0)
    ids, mask = bucket_prompts(input_ids, attention_mask, length_bucket, gen_config.pad_token_id)
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
