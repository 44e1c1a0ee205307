"""Tests of KV-cache generation (imgllm/language/decoding.py, beam.py) on a tiny GPT-2. Token selection itself:
tests/test_sampling.py."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgllm.language import decoding as gen
from imgllm.language.decoding import GenerationConfig, beam_search_tokens, generate, generate_tokens
from imgllm.language.gpt2 import GPT2, GPT2Config, init_params
from imgllm.language.matmul_cpu import kernels_out_in

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
        mask[row, : 6 - length] = 0
        ids[row, : 6 - length] = PAD
    return ids, mask


def _config(**overrides):
    settings = dict(max_new_tokens=NEW, eos_token_id=None, pad_token_id=PAD)
    return GenerationConfig(**{**settings, **overrides})


_jit_generate_tokens = jax.jit(generate_tokens, static_argnames=("model_config", "gen_config"))


def _run(params, ids, mask, gen_config, rng=None, **kwargs):
    rng = jax.random.key(0) if rng is None else rng
    tokens, scores = _jit_generate_tokens(
        params, CONFIG, jnp.asarray(ids), jnp.asarray(mask), rng, gen_config, **kwargs
    )
    return np.asarray(tokens), np.asarray(scores)


def _greedy_without_cache(params, prompt, steps):
    """Reference: recompute the whole sequence for every new token, without cache or padding. The sequence lives
    in a fixed-size buffer (one compile); causal attention makes the logits at position t independent of the
    unused slots after it."""
    forward = jax.jit(lambda p, ids: GPT2(CONFIG).apply({"params": p}, ids)[0][0])
    buffer = np.zeros((1, len(prompt) + steps), np.int32)
    buffer[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + steps):
        buffer[0, t] = int(jnp.argmax(forward(params, jnp.asarray(buffer))[t - 1]))
    return buffer[0, len(prompt) :].tolist()


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
    assert (tokens[1, stop_at + 1 :] == PAD).all() and stop_at + 1 < NEW


@pytest.mark.parametrize("gen", [dict(), dict(do_sample=True, top_p=0.8), dict(num_beams=3)])
def test_kernels_out_in_params_generate_the_same_tokens(params, prompts, gen):
    ids, mask = prompts
    tokens, scores = _run(params, ids, mask, _config(**gen))
    out_in_tokens, out_in_scores = _run(kernels_out_in(params), ids, mask, _config(**gen))
    np.testing.assert_array_equal(out_in_tokens, tokens)
    np.testing.assert_allclose(out_in_scores, scores, atol=1e-4)


@pytest.mark.parametrize("gen", [dict(), dict(num_beams=3, num_return_sequences=2)])
def test_the_cpu_fast_paths_decode_what_the_plain_paths_decode(params, prompts, gen):
    """Plain sampler on the stored [in, out] parameters (what GPU/TPU run) against the CPU sampler on the
    kernels_out_in parameters: greedy and beam search agree token for token, scores within float tolerance."""
    ids, mask = prompts
    plain, plain_scores = _run(params, ids, mask, _config(sampler="plain", **gen))
    fast, fast_scores = _run(kernels_out_in(params), ids, mask, _config(sampler="cpu", **gen))
    np.testing.assert_array_equal(fast, plain)
    np.testing.assert_allclose(fast_scores, plain_scores, atol=1e-4)


@pytest.mark.parametrize("sampler", ["plain", "cpu"])
def test_sampled_tokens_stay_in_the_top_p_nucleus_on_both_samplers(params, prompts, sampler):
    """Sampled decoding with top-p (tokens and their scores) through the whole loop: every token lies in the
    nucleus of the model's next-token distribution given the tokens before it (recomputed without cache)."""
    ids, mask = prompts
    config = _config(do_sample=True, top_p=0.5, temperature=1.5, sampler=sampler)
    tokens, _ = _run(params, ids[:1], mask[:1], config, jax.random.key(7))
    sequence = np.concatenate([ids[0], tokens[0]])
    logits = (
        np.asarray(jax.jit(lambda p, x: GPT2(CONFIG).apply({"params": p}, x)[0][0])(params, sequence[None]), np.float64)
        / 1.5
    )
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for step, token in enumerate(tokens[0]):
        row = probs[len(ids[0]) - 1 + step]
        assert row[row > row[token]].sum() < 0.5 + 1e-5, (step, token)


def test_sampling_is_reproducible_from_the_key(params, prompts):
    ids, mask = prompts
    config = _config(do_sample=True, max_new_tokens=16)
    first, _ = _run(params, ids, mask, config, jax.random.key(1))
    again, _ = _run(params, ids, mask, config, jax.random.key(1))
    other, _ = _run(params, ids, mask, config, jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


@pytest.mark.parametrize("sampler", ["plain", "cpu"])
def test_top_k_1_sampling_equals_greedy(params, prompts, sampler):
    ids, mask = prompts
    greedy, _ = _run(params, ids, mask, _config())
    top1, _ = _run(
        params, ids, mask, _config(do_sample=True, top_k=1, temperature=0.7, sampler=sampler), jax.random.key(3)
    )
    np.testing.assert_array_equal(top1, greedy)


def test_num_return_sequences_draws_independent_samples(params, prompts):
    ids, mask = prompts
    tokens, scores = _run(params, ids, mask, _config(do_sample=True, num_return_sequences=3, temperature=2.0))
    assert tokens.shape == (9, NEW) and scores.shape == (9,)
    assert len({tuple(t) for t in tokens[:3]}) > 1  # three draws for prompt 0 differ


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
    every_pair = jnp.concatenate(
        [jnp.repeat(jnp.asarray(prompt), CONFIG.vocab_size, axis=0), jnp.arange(CONFIG.vocab_size)[:, None]], axis=1
    )
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
            assert (row[stop[0] + 1 :] == PAD).all()


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
        joined_ids[row, 9 - len(joined) :], joined_mask[row, 9 - len(joined) :] = joined, 1
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
