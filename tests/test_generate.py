"""Tests of KV-cache generation (imgllm/generate.py) on a tiny GPT-2."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgllm.language import decoding as gen
from imgllm.language.decoding import (GenerationConfig, argmax_first, beam_search_tokens, draw_categorical, draw_top_p,
                             generate, generate_tokens, process_logits, sampling_weights, select_tokens)
from imgllm.language.gpt2 import GPT2, GPT2Config, init_params, kernels_out_in

CONFIG = GPT2Config.tiny()
PAD = CONFIG.eos_token_id
NEW = 8


@pytest.fixture(scope="module")
def params():
    # Larger-than-default init makes the tiny model's predictions peaked, so near-ties (which would make greedy
    # comparisons fragile) are unlikely.
    return jax.tree.map(lambda p: p * 4.0, init_params(CONFIG, jax.random.key(0)))


@pytest.fixture(scope="module")
def prompts():
    """Three left-padded prompts of lengths 6, 2 and 4 (no EOS inside)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIG.vocab_size - 1, (3, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, length in enumerate([6, 2, 4]):
        mask[row, :6 - length] = 0
        ids[row, :6 - length] = PAD
    return ids, mask


def _config(**overrides):
    settings = dict(max_new_tokens=NEW, eos_token_id=None, pad_token_id=PAD)
    return GenerationConfig(**{**settings, **overrides})


_jit_generate_tokens = jax.jit(generate_tokens, static_argnames=("model_config", "gen_config"))


def _run(params, ids, mask, gen_config, rng=None, **kwargs):
    rng = jax.random.key(0) if rng is None else rng
    tokens, scores = _jit_generate_tokens(params, CONFIG, jnp.asarray(ids), jnp.asarray(mask), rng, gen_config,
                                          **kwargs)
    return np.asarray(tokens), np.asarray(scores)


def _greedy_without_cache(params, prompt, steps):
    """Reference: recompute the whole sequence for every new token, without cache or padding. The sequence lives
    in a fixed-size buffer (one compile); causal attention makes the logits at position t independent of the
    unused slots after it."""
    forward = jax.jit(lambda p, ids: GPT2(CONFIG).apply({"params": p}, ids)[0][0])
    buffer = np.zeros((1, len(prompt) + steps), np.int32)
    buffer[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + steps):
        buffer[0, t] = int(jnp.argmax(forward(params, jnp.asarray(buffer))[t - 1]))
    return buffer[0, len(prompt):].tolist()


def test_cached_decoding_equals_recomputing_the_sequence(params, prompts):
    ids, mask = prompts
    tokens, _ = _run(params, ids[:1], mask[:1], _config())
    assert tokens[0].tolist() == _greedy_without_cache(params, ids[0].tolist(), NEW)


def test_left_padded_batch_gives_the_same_tokens_as_each_prompt_alone(params, prompts):
    ids, mask = prompts
    batch_tokens, batch_scores = _run(params, ids, mask, _config())
    for row in range(len(ids)):
        alone = ids[row][mask[row] == 1][None]
        tokens, scores = _run(params, alone, np.ones_like(alone), _config())
        np.testing.assert_array_equal(batch_tokens[row], tokens[0])
        np.testing.assert_allclose(batch_scores[row], scores[0], rtol=1e-4)


def test_stops_at_eos_and_pads_afterwards(params, prompts):
    ids, mask = prompts
    free, _ = _run(params, ids, mask, _config())
    # The end-of-sequence token: the first token of prompt 1's continuation that is new after position 0.
    stop_at = next(i for i in range(1, NEW - 1) if free[1, i] not in free[1, :i])
    eos = int(free[1, stop_at])
    tokens, _ = _run(params, ids, mask, _config(eos_token_id=eos))
    for row in range(3):  # every row continues up to and including its own first EOS, then pads
        stops = np.flatnonzero(free[row] == eos)
        end = stops[0] + 1 if len(stops) else NEW
        np.testing.assert_array_equal(tokens[row, :end], free[row, :end])
        assert (tokens[row, end:] == PAD).all()
    assert (tokens[1, stop_at + 1:] == PAD).all() and stop_at + 1 < NEW


@pytest.mark.parametrize("gen", [dict(), dict(do_sample=True, top_p=0.8), dict(num_beams=3)])
def test_kernels_out_in_params_generate_the_same_tokens(params, prompts, gen):
    ids, mask = prompts
    tokens, scores = _run(params, ids, mask, _config(**gen))
    out_in_tokens, out_in_scores = _run(kernels_out_in(params), ids, mask, _config(**gen))
    np.testing.assert_array_equal(out_in_tokens, tokens)
    np.testing.assert_allclose(out_in_scores, scores, atol=1e-4)


def test_sampling_is_reproducible_from_the_key(params, prompts):
    ids, mask = prompts
    config = _config(do_sample=True, max_new_tokens=16)
    first, _ = _run(params, ids, mask, config, jax.random.key(1))
    again, _ = _run(params, ids, mask, config, jax.random.key(1))
    other, _ = _run(params, ids, mask, config, jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_top_k_1_sampling_equals_greedy(params, prompts):
    ids, mask = prompts
    greedy, _ = _run(params, ids, mask, _config())
    top1, _ = _run(params, ids, mask, _config(do_sample=True, top_k=1, temperature=0.7), jax.random.key(3))
    np.testing.assert_array_equal(top1, greedy)


def test_num_return_sequences_draws_independent_samples(params, prompts):
    ids, mask = prompts
    tokens, scores = _run(params, ids, mask, _config(do_sample=True, num_return_sequences=3, temperature=2.0))
    assert tokens.shape == (9, NEW) and scores.shape == (9,)
    assert len({tuple(t) for t in tokens[:3]}) > 1  # three draws for prompt 0 differ


def test_process_logits_applies_temperature_top_k_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert jnp.isinf(process_logits(logits, _config(do_sample=True, top_k=2))[0, 2:]).all()
    kept = ~jnp.isinf(process_logits(logits, _config(do_sample=True, top_p=0.7))[0])
    np.testing.assert_array_equal(kept, [True, True, False, False])  # 0.5 < 0.7 needs the 0.3 token too
    hot = process_logits(logits, _config(do_sample=True, temperature=2.0))
    np.testing.assert_allclose(hot, logits / 2.0)
    np.testing.assert_array_equal(process_logits(logits, _config(top_k=1)), logits)  # no-op unless sampling


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    """The bisection filter keeps what the sorted-cumsum definition keeps (float64 reference in numpy)."""
    logits = np.asarray(jax.random.normal(jax.random.key(3), (6, 500)) * 2.5, np.float64)
    logits[5, 7] = 40.0                                  # one token holds nearly all the mass: kept alone
    for top_p in (0.2, 0.7, 0.95):
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        kept_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
        expected = np.zeros_like(kept_sorted)
        np.put_along_axis(expected, order, kept_sorted, -1)
        filtered = process_logits(jnp.asarray(logits, jnp.float32), _config(do_sample=True, top_p=top_p))
        np.testing.assert_array_equal(np.isfinite(np.asarray(filtered)), expected, err_msg=f"top_p={top_p}")
        assert np.isfinite(np.asarray(filtered))[5].sum() == 1


def test_beam_search_with_one_beam_equals_greedy(params, prompts):
    ids, mask = prompts
    greedy, _ = _run(params, ids, mask, _config())
    beam = jax.jit(beam_search_tokens, static_argnames=("model_config", "gen_config"))
    tokens, _ = beam(params, CONFIG, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), _config(num_beams=1))
    np.testing.assert_array_equal(np.asarray(tokens), greedy)


def test_beam_search_with_a_beam_per_token_is_exhaustive(params, prompts):
    """With as many beams as vocabulary entries, two-token beam search must find the most likely continuation."""
    ids, mask = prompts
    prompt = ids[1:2, 4:]
    tokens, score = _run(params, prompt, np.ones_like(prompt), _config(max_new_tokens=2, num_beams=CONFIG.vocab_size))
    log_probs = jax.jit(lambda p, x: jax.nn.log_softmax(GPT2(CONFIG).apply({"params": p}, x)[0][:, -1]))
    first = log_probs(params, jnp.asarray(prompt))[0]
    every_pair = jnp.concatenate([jnp.repeat(jnp.asarray(prompt), CONFIG.vocab_size, axis=0),
                                  jnp.arange(CONFIG.vocab_size)[:, None]], axis=1)
    totals = first[:, None] + log_probs(params, every_pair)  # [first token, second token]
    best = np.unravel_index(int(jnp.argmax(totals)), totals.shape)
    assert tuple(tokens[0]) == best
    np.testing.assert_allclose(score[0], totals[best] / 2.0, rtol=1e-5)  # length_penalty 1: mean log-prob


def test_beam_search_returns_best_first_with_eos_finished(params, prompts):
    ids, mask = prompts
    free, _ = _run(params, ids, mask, _config())
    eos = int(free[0, 1])
    tokens, scores = _run(params, ids, mask, _config(num_beams=4, num_return_sequences=2, eos_token_id=eos))
    assert tokens.shape == (6, NEW)
    assert (scores[0::2] >= scores[1::2]).all()
    for row in tokens:  # every returned hypothesis is padded after its EOS
        stop = np.flatnonzero(row == eos)
        if len(stop):
            assert (row[stop[0] + 1:] == PAD).all()


def test_prefix_embeds_equal_prefix_tokens(params, prompts):
    ids, mask = prompts
    prefix_ids = np.random.default_rng(5).integers(0, CONFIG.vocab_size - 1, (3, 3)).astype(np.int32)
    embed = jax.jit(lambda p, x: GPT2(CONFIG).apply({"params": p}, x, method=GPT2.embed_tokens))
    with_prefix, _ = _run(params, ids, mask, _config(), prefix_embeds=embed(params, jnp.asarray(prefix_ids)))
    # The same prefix followed by the same prompts, as plain tokens, left-padded.
    joined_ids = np.full((3, 9), PAD, np.int32)
    joined_mask = np.zeros((3, 9), np.int32)
    for row in range(3):
        joined = np.concatenate([prefix_ids[row], ids[row][mask[row] == 1]])
        joined_ids[row, 9 - len(joined):], joined_mask[row, 9 - len(joined):] = joined, 1
    tokens, _ = _run(params, joined_ids, joined_mask, _config())
    np.testing.assert_array_equal(with_prefix, tokens)


def test_generate_buckets_prompt_lengths_without_recompiling(params, prompts):
    ids, mask = prompts
    config = _config(max_new_tokens=5)
    compiled_before = gen._generate_jit._cache_size()
    first, _ = generate(params, CONFIG, ids, mask, gen_config=config, length_bucket=8)
    assert gen._generate_jit._cache_size() == compiled_before + 1
    # Shorter prompts (a different array width) in the same length bucket: the same compiled program.
    second, _ = generate(params, CONFIG, ids[:, 2:], mask[:, 2:], gen_config=config, length_bucket=8)
    assert gen._generate_jit._cache_size() == compiled_before + 1
    np.testing.assert_array_equal(first[0], _run(params, ids[:1], mask[:1], config)[0][0])
    np.testing.assert_array_equal(second[1:], first[1:])  # rows 1 and 2 lost only padding


def test_generate_rejects_bad_prompts_before_compiling(params, prompts):
    ids, mask = prompts
    right_padded = mask[:, ::-1].copy()
    with pytest.raises(ValueError, match="prompt 1 is not left-padded"):
        generate(params, CONFIG, ids, right_padded, gen_config=_config())
    with pytest.raises(ValueError, match=r"input_ids\[0, 0\]=999"):
        generate(params, CONFIG, np.full((1, 3), 999), gen_config=_config())
    with pytest.raises(ValueError, match="explicit rng"):
        generate(params, CONFIG, ids, mask, gen_config=_config(do_sample=True))
    with pytest.raises(ValueError, match="n_positions"):
        generate(params, CONFIG, ids, mask, gen_config=_config(max_new_tokens=CONFIG.n_positions))
    with pytest.raises(ValueError, match="num_return_sequences"):
        _config(num_beams=2, num_return_sequences=3)


def test_generate_shards_the_batch_over_devices():
    """Four simulated CPU devices give the same tokens as one (runs in a subprocess: the device count is fixed
    when jax starts)."""
    script = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import Mesh
        from imgllm.language.decoding import GenerationConfig, generate
        from imgllm.language.gpt2 import GPT2Config, init_params
        config = GPT2Config.tiny()
        params = jax.tree.map(lambda p: p * 4.0, init_params(config, jax.random.key(0)))
        ids = np.random.default_rng(0).integers(0, 127, (6, 5))
        mask = np.ones_like(ids); mask[1, :3] = 0
        gen_config = GenerationConfig(max_new_tokens=4, eos_token_id=None, pad_token_id=127)
        four = Mesh(np.array(jax.devices()), ("data",))
        one = Mesh(np.array(jax.devices()[:1]), ("data",))
        assert four.shape["data"] == 4
        a, _ = generate(params, config, ids, mask, gen_config=gen_config, mesh=four)
        b, _ = generate(params, config, ids, mask, gen_config=gen_config, mesh=one)
        assert a.shape == (6, 4) and (a == b).all(), (a, b)
        print("OK")
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_argmax_first_equals_argmax_with_ties_and_infinities():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, size=(64, 1000)).astype(np.float32)    # many ties per row
    logits[0] = -np.inf
    logits[1, 5:] = np.inf
    np.testing.assert_array_equal(argmax_first(jnp.asarray(logits)), np.argmax(logits, axis=-1))
    with_nan = np.zeros((1, 10), np.float32)
    with_nan[0, 3] = np.nan
    assert 0 <= int(argmax_first(jnp.asarray(with_nan))[0]) < 10


@pytest.mark.parametrize("size", [12, 1031, 2062])
def test_draw_categorical_matches_the_weights(size):
    """Sizes that take each blocking: one padded block (12), padded blocks of 256 (1031, a prime), and a free
    reshape into 2 blocks of 1,031 each split again into padded sub-blocks of 256 (2062 = 2 x 1031). Zero weights
    sit inside blocks, at block ends and fill whole blocks; they are never drawn."""
    weights = np.zeros(size, np.float32)
    positive = sorted({1, 3, size - 1} | ({255, 256, 700, 1030, 1031, 1500} & set(range(size))))
    weights[positive] = np.linspace(1.0, 2.0, len(positive))
    draws = 30_000
    tokens = jax.jit(lambda key: draw_categorical(jnp.broadcast_to(weights, (draws, size)), key))(jax.random.key(0))
    frequencies = np.bincount(np.asarray(tokens), minlength=size) / draws
    np.testing.assert_array_equal(frequencies[weights == 0], 0.0)
    np.testing.assert_allclose(frequencies, weights / weights.sum(), atol=0.012)  # > 4 standard deviations


def test_top_p_sampling_draws_only_from_the_nucleus():
    probs = np.array([[0.4, 0.25, 0.2, 0.1, 0.05]], np.float32)
    config = _config(do_sample=True, top_p=0.8)
    weights = np.asarray(sampling_weights(jnp.log(probs), config))
    np.testing.assert_allclose(weights / weights.sum(), [[0.4 / 0.85, 0.25 / 0.85, 0.2 / 0.85, 0.0, 0.0]], rtol=1e-6)
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (20_000, 5))
    tokens = jax.jit(lambda key: select_tokens(logits, key, config))(jax.random.key(1))
    frequencies = np.bincount(np.asarray(tokens), minlength=5) / 20_000
    np.testing.assert_allclose(frequencies, [0.4 / 0.85, 0.25 / 0.85, 0.2 / 0.85, 0, 0], atol=0.015)


@pytest.mark.parametrize("max_rounds", [0, 1, 8])
def test_draw_top_p_is_exact_with_and_without_the_bisection_fallback(max_rounds):
    """Rejection rounds, the bisection fallback (max_rounds=0: every row), and their mix (1 round: a quarter of
    the rows fall back) all draw from the nucleus in proportion to the probabilities."""
    probs = np.array([0.05, 0.3, 0.1, 0.2, 0.25, 0.1], np.float32)  # top_p 0.7: {0.3, 0.25, 0.2}, mass 0.75
    draws = 40_000
    tokens = jax.jit(lambda key: draw_top_p(jnp.broadcast_to(probs, (draws, probs.size)), 0.7, key,
                                            max_rounds=max_rounds))(jax.random.key(2))
    frequencies = np.bincount(np.asarray(tokens), minlength=probs.size) / draws
    nucleus = np.where(probs >= 0.2, probs, 0.0)
    np.testing.assert_array_equal(frequencies[nucleus == 0], 0.0)
    np.testing.assert_allclose(frequencies, nucleus / nucleus.sum(), atol=0.01)  # > 4 standard deviations


def test_draw_top_p_stays_in_the_sorted_cumsum_nucleus():
    """Every draw lies in the nucleus of the sorted-cumsum definition (float64 reference), for small and large top_p,
    a row where one token holds nearly all the mass, and few rounds (the fallback runs for some rows)."""
    logits = np.asarray(jax.random.normal(jax.random.key(4), (8, 300)) * 2.0, np.float64)
    logits[7, 11] = 40.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, -1)
    for top_p in (0.1, 0.6, 0.95):
        kept_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
        nucleus = np.zeros_like(kept_sorted)
        np.put_along_axis(nucleus, order, kept_sorted, -1)
        repeated = jnp.asarray(np.repeat(probs, 500, axis=0), jnp.float32)
        tokens = np.asarray(draw_top_p(repeated, top_p, jax.random.key(5), max_rounds=2)).reshape(8, 500)
        assert np.take_along_axis(nucleus, tokens, -1).all(), f"top_p={top_p}"
        assert (tokens[7] == 11).all()
