"""The visual prefix: PrefixMapper shapes, CNN feature sources, and the jitted image -> prefix -> LM path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables  # seeded weights without compiling initialisers
from jax import lax

from imgllm.bridge import PrefixMapper, check_mapper_fits
from imgllm.language.gpt2 import GPT2, GPT2Config, init_params
from imgllm.language.model import embed_tokens
from imgllm.language.scoring import prefixed_token_log_probs, prefixed_token_stats
from imgllm.vision import cnn as cnn_lib
from imgllm.vision.features import cnn_outputs, max_pool_to_grid

jax.config.update("jax_enable_x64", False)


def whitening_stem(params, x):
    """The CNN's whitening stem as airbench defines it, GELU(conv2x2 VALID (x, whiten_kernel) + whiten_bias), written
    here with lax as the oracle of the stem the CNN gives in its "pyramid" features: [B, H-1, W-1, whiten_width]."""
    stem = lax.conv_general_dilated(
        x, params["whiten_kernel"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.nn.gelu(stem + params["whiten_bias"], approximate=False)


@pytest.fixture(scope="module")
def parts():
    cnn = cnn_lib.CNN(num_classes=4, widths=(8, 16, 16), conv_impl="xla")
    images = np.random.default_rng(0).standard_normal((3, 32, 32, 3)).astype(np.float32)
    cnn_variables = random_variables(lambda: cnn.init(jax.random.key(1), images, train=False), seed=1)
    lm_config = GPT2Config.tiny(vocab_size=24, bos_token_id=0, eos_token_id=0)
    lm_params = random_variables(lambda: init_params(lm_config, jax.random.key(2)), seed=2)
    return cnn, cnn_variables, images, lm_config, lm_params


def test_mapper_shapes_and_errors(parts):
    *_, lm_config, _ = parts
    mapper = PrefixMapper(prefix_length=5, lm_dim=lm_config.n_embd, hidden=16)
    # Shapes by tracing only (jax.eval_shape): no compile needed.
    params = jax.eval_shape(mapper.init, jax.random.key(0), jnp.zeros((1, 7)))["params"]
    assert params["fc_1"]["kernel"].shape == (7, 16) and params["fc_2"]["kernel"].shape == (16, 5 * 32)
    assert jax.eval_shape(mapper.apply, {"params": params}, jnp.ones((2, 7))).shape == (2, 5, lm_config.n_embd)
    default_hidden = jax.eval_shape(PrefixMapper(4, 32).init, jax.random.key(0), jnp.zeros((1, 7)))
    assert default_hidden["params"]["fc_1"]["kernel"].shape == (7, 64)
    with pytest.raises(ValueError, match="features"):
        jax.eval_shape(mapper.apply, {"params": params}, jnp.ones((2, 3, 7)))
    with pytest.raises(ValueError, match="n_embd=32"):
        check_mapper_fits(PrefixMapper(4, 64), lm_config)


def test_feature_sources(parts):
    cnn, cnn_variables, images, *_ = parts

    @jax.jit
    def all_sources(variables, x):
        _, captured = cnn.apply(
            variables,
            x,
            train=False,
            mutable=["intermediates"],
            capture_intermediates=lambda module, _: module.path == ("block1", "conv1"),
        )
        return dict(
            reference=cnn.apply(variables, x, train=False),
            **{source: cnn_outputs(cnn, variables, x, source) for source in ("pooled", "spatial", "pyramid")},
            stem=whitening_stem(variables["params"], x),
            conv1=captured["intermediates"]["block1"]["conv1"]["__call__"][0],
        )

    out = all_sources(cnn_variables, images)
    (reference_logits, reference_features), (logits, pooled) = out["reference"], out["pooled"]
    np.testing.assert_array_equal(pooled, reference_features)
    np.testing.assert_array_equal(logits, reference_logits)
    spatial_logits, spatial = out["spatial"]
    np.testing.assert_array_equal(spatial_logits, reference_logits)
    # The last block's map is 3x3x16 for 32x32 inputs; its global max is the pooled feature vector.
    assert spatial.shape == (3, 3 * 3 * 16)
    np.testing.assert_allclose(spatial.reshape(3, 9, 16).max(1), pooled, rtol=1e-6)
    pyramid, stem = out["pyramid"][1], out["stem"]
    assert pyramid.shape == (3, 3 * 3 * (24 + 8 + 16 + 16))  # stem + the three blocks
    np.testing.assert_array_equal(pyramid[:, -spatial.shape[1] :], spatial)  # the last block's grid, unpooled
    assert stem.shape == (3, 31, 31, 24)
    np.testing.assert_allclose(pyramid[:, : 3 * 3 * 24], max_pool_to_grid(stem, (3, 3)).reshape(3, -1), rtol=1e-6)
    # The oracle stem is what the CNN feeds block1: with block1's first conv set to the identity on its 8
    # output channels (airbench's dirac init), its output is the stem's first 8 channels.
    identity = np.zeros((3, 3, 24, 8), np.float32)
    identity[1, 1, np.arange(8), np.arange(8)] = 1
    params = {**cnn_variables["params"], "block1": {**cnn_variables["params"]["block1"], "conv1": {"kernel": identity}}}
    conv1 = all_sources({**cnn_variables, "params": params}, images)["conv1"]
    np.testing.assert_allclose(conv1, stem[..., :8], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        max_pool_to_grid(np.arange(16.0).reshape(1, 4, 4, 1), (2, 2))[0, ..., 0], [[5.0, 7.0], [13.0, 15.0]]
    )
    with pytest.raises(ValueError, match="feature_source='mean'"):
        cnn_outputs(cnn, cnn_variables, images, "mean")


def test_log_probs_match_full_lm_and_ignore_right_padding(parts):
    *_, lm_config, lm_params = parts
    prefix = np.random.default_rng(3).standard_normal((2, 4, lm_config.n_embd)).astype(np.float32)
    ids = jnp.array([[0, 5, 6, 7, 0, 0], [0, 9, 3, 0, 0, 0]])
    other_padding = ids.at[1, 4:].set(jnp.array([11, 12]))  # different padding after the second row's EOS

    @jax.jit
    def compute(params, prefix, ids, other_padding):
        embeds = jnp.concatenate([prefix, embed_tokens(params, lm_config, ids)], 1)
        full, _ = GPT2(lm_config).apply({"params": params}, inputs_embeds=embeds)
        stats = prefixed_token_stats(
            params, lm_config, jnp.concatenate([prefix, prefix]), jnp.concatenate([ids, other_padding])
        )
        return full, stats, prefixed_token_log_probs(params, lm_config, prefix, ids)

    full, (both_log_probs, both_argmax), log_probs = compute(lm_params, prefix, ids, other_padding)
    assert log_probs.shape == (2, 5)
    expected = jnp.take_along_axis(jax.nn.log_softmax(full[:, 4:-1]), ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both_log_probs[:2], log_probs, rtol=1e-5, atol=1e-6)
    # Changing the padding after a sequence's EOS leaves its real tokens' values unchanged.
    np.testing.assert_allclose(both_log_probs[3, :3], log_probs[1, :3], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(both_argmax[:2], jnp.argmax(full[:, 4:-1], -1) == ids[:, 1:])
    with pytest.raises(ValueError, match="prefix_embeds"):
        jax.eval_shape(lambda p: prefixed_token_log_probs(p, lm_config, prefix[:1], ids), lm_params)


def test_image_to_caption_likelihood_compiles_once_and_matches_stages(parts):
    cnn, cnn_variables, images, lm_config, lm_params = parts
    mapper = PrefixMapper(prefix_length=3, lm_dim=lm_config.n_embd, feature_source="pyramid")
    features = jax.jit(lambda v, x: cnn_outputs(cnn, v, x, mapper.feature_source)[1])(cnn_variables, images)
    bridge = random_variables(lambda: mapper.init(jax.random.key(4), features), seed=4)["params"]
    ids = jnp.array([[0, 4, 5, 0], [0, 6, 0, 0], [0, 7, 8, 9]])

    @jax.jit
    def caption_log_probs(params, images, ids):
        _, features = cnn_outputs(cnn, params["cnn"], images, mapper.feature_source)
        prefix = mapper.apply({"params": params["bridge"]}, features)
        return prefixed_token_log_probs(params["lm"], lm_config, prefix, ids)

    params = {"cnn": cnn_variables, "bridge": bridge, "lm": lm_params}
    fused = caption_log_probs(params, images, ids)
    caption_log_probs(params, images * 0.5, ids)
    assert caption_log_probs._cache_size() == 1
    # Stage by stage, each stage run on its own (features above).
    prefix = jax.jit(mapper.apply)({"params": bridge}, features)

    @jax.jit
    def lm_stage(prefix, ids):
        embeds = jnp.concatenate([prefix, embed_tokens(lm_params, lm_config, ids)], 1)
        logits, _ = GPT2(lm_config).apply({"params": lm_params}, inputs_embeds=embeds)
        return jnp.take_along_axis(jax.nn.log_softmax(logits[:, 3:-1]), ids[:, 1:, None], -1)[..., 0]

    np.testing.assert_allclose(fused, lm_stage(prefix, ids), rtol=1e-4, atol=1e-4)
