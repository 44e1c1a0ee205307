"""Tests of the GPT-2 flax model (imgllm/language/gpt2.py) and its CPU matmul path (imgllm/language/matmul_cpu.py)
on a tiny configuration."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgllm.language.cache import attention_bias, init_cache
from imgllm.language.gpt2 import GPT2, GPT2Config, init_params
from imgllm.language.matmul_cpu import KERNEL_FIRST_ROWS, OutInDense, OutInParams, few_rows_times_out_in, kernels_out_in
from imgllm.language.model import model_and_params

CONFIG = GPT2Config.tiny()


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def _apply(params, *args, config=CONFIG, method=None, deterministic=True, return_hidden=False, **kwargs):
    """GPT2.apply under jit (one compile instead of eager op-by-op dispatch, much faster on a busy CPU)."""
    static = dict(deterministic=deterministic, return_hidden=return_hidden) if method is None else {}
    run = jax.jit(lambda p, args, kwargs: GPT2(config).apply({"params": p}, *args, method=method, **static, **kwargs))
    return run(params, args, kwargs)


def _left_padded_batch(rng, lengths, width):
    ids = rng.integers(0, CONFIG.vocab_size, (len(lengths), width)).astype(np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    return ids, mask


def _hf_positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def test_parameter_tree_mirrors_hugging_face_names_and_shapes(params):
    d, v, n = CONFIG.n_embd, CONFIG.vocab_size, CONFIG.n_positions
    expected = {"wte/embedding": (v, d), "wpe/embedding": (n, d), "ln_f/scale": (d,), "ln_f/bias": (d,)}
    for i in range(CONFIG.n_layer):
        expected.update(
            {
                f"h_{i}/ln_1/scale": (d,),
                f"h_{i}/ln_1/bias": (d,),
                f"h_{i}/ln_2/scale": (d,),
                f"h_{i}/ln_2/bias": (d,),
                f"h_{i}/attn/c_attn/kernel": (d, 3 * d),
                f"h_{i}/attn/c_attn/bias": (3 * d,),
                f"h_{i}/attn/c_proj/kernel": (d, d),
                f"h_{i}/attn/c_proj/bias": (d,),
                f"h_{i}/mlp/c_fc/kernel": (d, 4 * d),
                f"h_{i}/mlp/c_fc/bias": (4 * d,),
                f"h_{i}/mlp/c_proj/kernel": (4 * d, d),
                f"h_{i}/mlp/c_proj/bias": (d,),
            }
        )
    flat = {"/".join(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    assert flat == expected


def test_gpt2_small_has_124m_parameters():
    shapes = jax.eval_shape(lambda: init_params(GPT2Config.small(), jax.random.key(0)))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == 124_439_808


def test_output_head_is_tied_to_token_embedding(params):
    ids = jnp.array([[1, 2, 3]])
    logits, cache = _apply(params, ids)
    hidden, _ = _apply(params, ids, return_hidden=True)
    assert cache is None and logits.shape == (1, 3, CONFIG.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, hidden @ params["wte"]["embedding"].T, rtol=1e-5, atol=1e-5)


def test_causal_attention_ignores_later_tokens(params):
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 8))
    changed = ids.copy()
    changed[0, 5:] = (changed[0, 5:] + 1) % CONFIG.vocab_size
    a, _ = _apply(params, jnp.asarray(ids))
    b, _ = _apply(params, jnp.asarray(changed))
    np.testing.assert_allclose(a[0, :5], b[0, :5], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[0, 5:], b[0, 5:])


def test_inputs_embeds_equal_token_ids(params):
    ids = jnp.array([[5, 9, 2, 7]])
    embeds = _apply(params, ids, method=GPT2.embed_tokens)
    from_ids, _ = _apply(params, ids)
    from_embeds, _ = _apply(params, inputs_embeds=embeds)
    np.testing.assert_allclose(from_ids, from_embeds, rtol=1e-6, atol=1e-6)


def test_left_padded_row_matches_unpadded_prompt(params):
    ids, mask = _left_padded_batch(np.random.default_rng(1), [7, 3], 7)
    batch_logits, _ = _apply(
        params, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(_hf_positions(mask))
    )
    alone, _ = _apply(params, jnp.asarray(ids[1:, 4:]))
    np.testing.assert_allclose(batch_logits[1, 4:], alone[0], rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(batch_logits))  # fully masked padding queries give no NaN


def test_cached_chunks_equal_full_forward(params):
    ids, mask = _left_padded_batch(np.random.default_rng(2), [9, 5, 2], 9)
    positions = _hf_positions(mask)
    full, _ = _apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=jnp.asarray(positions))
    slots = 12
    cache_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, slots - 9)), constant_values=1))
    cache = init_cache(CONFIG, 3, slots)
    pieces = []
    for start, stop in [(0, 4), (4, 5), (5, 9)]:
        logits, cache = _apply(
            params,
            jnp.asarray(ids[:, start:stop]),
            attention_mask=cache_mask,
            position_ids=jnp.asarray(positions[:, start:stop]),
            cache=cache,
        )
        pieces.append(logits)
    assert int(cache.index) == 9
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)


def test_kernels_out_in_computes_the_same_logits(params):
    """The [out, in] kernel layout is a storage choice: same logits, transposed kernels, other leaves untouched,
    and shapes convert through jax.eval_shape (how infer.py compiles before the weights are read)."""
    converted = kernels_out_in(params)
    assert isinstance(converted, OutInParams) and kernels_out_in(converted) is converted
    c_fc = params["h_0"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_array_equal(converted.params["h_0"]["mlp"]["c_fc"]["kernel"], c_fc.T)
    np.testing.assert_array_equal(converted.params["wte"]["embedding"], params["wte"]["embedding"])
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 7)), jnp.int32)
    model, raw = model_and_params(converted, CONFIG)
    assert model.kernel_out_in and model_and_params(params, CONFIG)[0] == GPT2(CONFIG)
    out_in_logits = jax.jit(lambda p: model.apply({"params": p}, ids)[0])(raw)
    np.testing.assert_allclose(out_in_logits, _apply(params, ids)[0], atol=1e-5)
    shapes = jax.eval_shape(kernels_out_in, params)
    assert shapes.params["h_1"]["attn"]["c_attn"]["kernel"].shape == (3 * CONFIG.n_embd, CONFIG.n_embd)


@pytest.mark.parametrize("lead_shape", [(1,), (2,), (3, 5), (KERNEL_FIRST_ROWS[1],), (KERNEL_FIRST_ROWS[1] + 1,)])
def test_linear_gives_the_same_product_in_both_layouts_at_any_row_count(lead_shape):
    """OutInDense ([out, in] kernels) switches to kernel-first products (few_rows_times_out_in) for few rows: the
    same numbers as the plain nn.Dense on the stored [in, out] layout, on each side of the switch."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((*lead_shape, 12)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((12, 20)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(20), jnp.float32)
    expected = np.asarray(x) @ np.asarray(kernel) + np.asarray(bias)
    for layer, stored in ((nn.Dense(20), kernel), (OutInDense(20), kernel.T)):
        y = jax.jit(layer.apply)({"params": {"kernel": stored, "bias": bias}}, x)
        assert y.shape == (*lead_shape, 20)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.jit(few_rows_times_out_in)(x, kernel.T), expected - np.asarray(bias), rtol=1e-5, atol=1e-5
    )


def test_the_matmul_path_is_chosen_by_the_parameters_not_the_backend(params, monkeypatch):
    """Tracing either layout never asks jax for the backend (the choice is made outside traced code, by
    converting the parameters); the converted model multiplies kernel-first (an optimisation barrier keeps the
    swap) exactly at the row counts of KERNEL_FIRST_ROWS, and the plain one never does."""

    def no_backend_question(*args, **kwargs):
        raise AssertionError("jax.default_backend() called while tracing the model")

    monkeypatch.setattr(jax, "default_backend", no_backend_question)
    assert KERNEL_FIRST_ROWS == (2, 64)
    for shape, kernel_first in (((1, 1), False), ((1, 4), True), ((8, 8), True), ((5, 13), False)):
        ids = jnp.zeros(shape, jnp.int32)
        for layout, expect in ((params, False), (kernels_out_in(params), kernel_first)):
            model, tree = model_and_params(layout, CONFIG)
            jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids)[0])(tree))
            assert ("optimization_barrier" in jaxpr) == expect, (shape, type(layout).__name__)


def test_attention_bias_is_causal_and_masked():
    bias = attention_bias(jnp.array([[0, 1, 1, 1]]), jnp.array([2, 3]))
    allowed = np.asarray(bias[0, 0]) == 0
    np.testing.assert_array_equal(allowed, [[False, True, True, False], [False, True, True, True]])


def test_bfloat16_compute_is_close_to_float32(params):
    ids = jnp.array([[3, 1, 4, 1, 5, 9]])
    f32, _ = _apply(params, ids)
    bf16, _ = _apply(params, ids, config=GPT2Config.tiny(dtype=jnp.bfloat16))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=0.05)


def test_dropout_needs_rng_only_when_not_deterministic(params):
    ids = jnp.array([[1, 2, 3, 4]])
    a, _ = _apply(params, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b, _ = _apply(params, ids, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)


def test_config_round_trips_through_hugging_face_dict():
    config = GPT2Config.tiny(layer_norm_epsilon=1e-6)
    hf = config.to_dict()
    assert hf["model_type"] == "gpt2" and hf["n_embd"] == 32 and hf["activation_function"] == "gelu_new"
    assert GPT2Config.from_dict(hf) == config
    assert GPT2Config.from_dict(hf, dtype=jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "key, value",
    [
        ("activation_function", "relu"),
        ("model_type", "llama"),
        ("n_inner", 100),
        ("scale_attn_by_inverse_layer_idx", True),
    ],
)
def test_config_rejects_unsupported_hugging_face_settings(key, value):
    with pytest.raises(ValueError, match=key):
        GPT2Config.from_dict({**GPT2Config.tiny().to_dict(), key: value}, source="ckpt/config.json")


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_head"):
        GPT2Config.tiny(n_head=5)
    with pytest.raises(ValueError, match="eos_token_id"):
        GPT2Config.tiny(eos_token_id=500)


def test_bad_inputs_raise_clear_errors(params):
    with pytest.raises(ValueError, match="exactly one"):
        _apply(params)
    with pytest.raises(ValueError, match="attention_mask"):
        _apply(params, jnp.ones((2, 5), jnp.int32), attention_mask=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="n_positions"):
        _apply(params, jnp.ones((1, CONFIG.n_positions + 1), jnp.int32))
    with pytest.raises(ValueError, match="n_positions"):
        init_cache(CONFIG, 1, CONFIG.n_positions + 1)
