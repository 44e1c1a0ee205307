"""Token selection (imgllm/language/sampling.py): the plain path against numpy, and XLA:CPU's fast path
(imgllm/language/sampling_cpu.py) against the plain path. Frequency tests use fixed keys: deterministic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from imgllm.language.decoding import GenerationConfig
from imgllm.language.sampling import process_logits, resolve_sampler, select_tokens, top_p_logits
from imgllm.language.sampling_cpu import argmax_first, draw_categorical, draw_top_p

SAMPLERS = ("plain", "cpu")


def _config(**overrides):
    return GenerationConfig(**{**dict(max_new_tokens=4, eos_token_id=None, pad_token_id=0), **overrides})


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Numpy float64 reference: bool mask of the sorted-cumsum nucleus (tokens whose preceding mass < top_p)."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, -1)
    kept_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
    kept = np.zeros_like(kept_sorted)
    np.put_along_axis(kept, order, kept_sorted, -1)
    return kept


def _softmax(logits: np.ndarray) -> np.ndarray:
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def _reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Numpy float64 reference of what sampling draws from: temperature, top-k, then the top-p nucleus."""
    logits = logits.astype(np.float64) / temperature
    if top_k:
        logits = np.where(logits < np.sort(logits)[-top_k], -np.inf, logits)
    probs = _softmax(logits)
    probs = np.where(_nucleus(probs, top_p), probs, 0.0)
    return probs / probs.sum()


def _frequencies(logits: np.ndarray, config: GenerationConfig, draws: int, seed: int) -> np.ndarray:
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, logits.size))
    tokens = jax.jit(select_tokens, static_argnums=2)(rows, jax.random.key(seed), config)
    return np.bincount(np.asarray(tokens), minlength=logits.size)


# Vocabulary sizes 64 (blocks from a free reshape) and 1031 (a prime: zero-padded blocks of 256); settings that
# cut the distribution in each way, and one that cuts nothing.
CASES = [
    (64, dict(top_p=0.9)),
    (64, dict(temperature=0.7, top_k=10, top_p=0.8)),
    (64, dict(temperature=1.3)),
    (64, dict(top_p=0.3)),
    (1031, dict(temperature=0.8, top_p=0.6)),
]


def _case_logits(vocab: int) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(vocab), (vocab,)) * 2.0, np.float64)


def test_resolve_sampler_picks_the_fast_path_on_cpu_only():
    assert resolve_sampler("auto", "cpu") == "cpu"
    assert resolve_sampler("auto", "gpu") == resolve_sampler("auto", "tpu") == "plain"
    assert resolve_sampler("plain", "cpu") == "plain" and resolve_sampler("cpu", "gpu") == "cpu"
    assert _config().sampler == "auto"  # chosen when the program is lowered, per platform (tests/test_lowering.py)
    assert _config(sampler="plain").sampler == "plain"
    with pytest.raises(ValueError, match="sampler"):
        _config(sampler="fast")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_process_logits_applies_temperature_top_k_top_p(sampler):
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    config = lambda **kw: _config(sampler=sampler, **kw)  # noqa: E731
    assert jnp.isinf(process_logits(logits, config(do_sample=True, top_k=2))[0, 2:]).all()
    kept = ~jnp.isinf(process_logits(logits, config(do_sample=True, top_p=0.7))[0])
    np.testing.assert_array_equal(kept, [True, True, False, False])  # 0.5 < 0.7 needs the 0.3 token too
    hot = process_logits(logits, config(do_sample=True, temperature=2.0))
    np.testing.assert_allclose(hot, logits / 2.0)
    np.testing.assert_array_equal(process_logits(logits, config(top_k=1)), logits)  # no-op unless sampling


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_top_p_keeps_the_smallest_set_reaching_the_mass(sampler):
    """Both nucleus filters (sort + cumsum; bisection) keep what the float64 numpy definition keeps."""
    logits = np.asarray(jax.random.normal(jax.random.key(3), (6, 500)) * 2.5, np.float64)
    logits[5, 7] = 40.0  # one token holds nearly all the mass: kept alone
    for top_p in (0.2, 0.7, 0.95):
        expected = _nucleus(_softmax(logits), top_p)
        config = _config(do_sample=True, top_p=top_p, sampler=sampler)
        filtered = process_logits(jnp.asarray(logits, jnp.float32), config)
        np.testing.assert_array_equal(np.isfinite(np.asarray(filtered)), expected, err_msg=f"top_p={top_p}")
        assert np.isfinite(np.asarray(filtered))[5].sum() == 1


def test_top_p_logits_keeps_logits_inside_and_at_least_one_token():
    logits = jnp.array([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    filtered = np.asarray(top_p_logits(logits, 1e-6))
    np.testing.assert_array_equal(filtered[0], [2.0, -np.inf, -np.inf, -np.inf])
    np.testing.assert_array_equal(filtered[1], [0.0] * 4)  # a tie at the cut keeps every tied token


@pytest.mark.parametrize("vocab, settings", CASES)
def test_plain_sampler_draws_the_numpy_reference_distribution(vocab, settings):
    logits = _case_logits(vocab)
    expected = _reference_distribution(
        logits, settings.get("temperature", 1.0), settings.get("top_k", 0), settings.get("top_p", 1.0)
    )
    draws = 20_000
    counts = _frequencies(logits, _config(do_sample=True, sampler="plain", **settings), draws, seed=0)
    np.testing.assert_array_equal(counts[expected == 0], 0)
    support = expected > 0
    assert stats.chisquare(counts[support], expected[support] * draws).pvalue > 1e-4
    np.testing.assert_allclose(counts / draws, expected, atol=0.015)


@pytest.mark.parametrize("vocab, settings", CASES)
def test_cpu_sampler_draws_what_the_plain_sampler_draws(vocab, settings):
    """Same support (the numpy nucleus), and frequencies that a two-sample chi-square test cannot tell apart."""
    logits = _case_logits(vocab)
    support = (
        _reference_distribution(
            logits, settings.get("temperature", 1.0), settings.get("top_k", 0), settings.get("top_p", 1.0)
        )
        > 0
    )
    draws = 20_000
    plain = _frequencies(logits, _config(do_sample=True, sampler="plain", **settings), draws, seed=1)
    fast = _frequencies(logits, _config(do_sample=True, sampler="cpu", **settings), draws, seed=2)
    np.testing.assert_array_equal(fast[~support], 0)
    np.testing.assert_array_equal(plain[~support], 0)
    seen = (plain + fast) > 0
    assert stats.chi2_contingency(np.stack([plain[seen], fast[seen]])).pvalue > 1e-4
    np.testing.assert_allclose(fast / draws, plain / draws, atol=0.02)


def test_greedy_selection_is_the_argmax_on_both_paths():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((16, 1031)), jnp.float32)
    plain = select_tokens(logits, jax.random.key(0), _config(sampler="plain"))
    fast = select_tokens(logits, jax.random.key(0), _config(sampler="cpu"))
    np.testing.assert_array_equal(plain, np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(fast, plain)


def test_argmax_first_equals_argmax_with_ties_and_infinities():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, size=(64, 1000)).astype(np.float32)  # many ties per row
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


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_top_p_sampling_draws_only_from_the_nucleus(sampler):
    probs = np.array([[0.4, 0.25, 0.2, 0.1, 0.05]], np.float32)
    config = _config(do_sample=True, top_p=0.8, sampler=sampler)
    weights = np.asarray(jax.nn.softmax(process_logits(jnp.log(probs), config)))
    np.testing.assert_allclose(weights, [[0.4 / 0.85, 0.25 / 0.85, 0.2 / 0.85, 0.0, 0.0]], rtol=1e-6)
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
    tokens = jax.jit(
        lambda key: draw_top_p(jnp.broadcast_to(probs, (draws, probs.size)), 0.7, key, max_rounds=max_rounds)
    )(jax.random.key(2))
    frequencies = np.bincount(np.asarray(tokens), minlength=probs.size) / draws
    nucleus = np.where(probs >= 0.2, probs, 0.0)
    np.testing.assert_array_equal(frequencies[nucleus == 0], 0.0)
    np.testing.assert_allclose(frequencies, nucleus / nucleus.sum(), atol=0.01)  # > 4 standard deviations


def test_draw_top_p_stays_in_the_sorted_cumsum_nucleus():
    """Every draw lies in the nucleus of the sorted-cumsum definition (float64 reference), for small and large top_p,
    a row where one token holds nearly all the mass, and few rounds (the fallback runs for some rows)."""
    logits = np.asarray(jax.random.normal(jax.random.key(4), (8, 300)) * 2.0, np.float64)
    logits[7, 11] = 40.0
    probs = _softmax(logits)
    for top_p in (0.1, 0.6, 0.95):
        nucleus = _nucleus(probs, top_p)
        repeated = jnp.asarray(np.repeat(probs, 500, axis=0), jnp.float32)
        tokens = np.asarray(draw_top_p(repeated, top_p, jax.random.key(5), max_rounds=2)).reshape(8, 500)
        assert np.take_along_axis(nucleus, tokens, -1).all(), f"top_p={top_p}"
        assert (tokens[7] == 11).all()
