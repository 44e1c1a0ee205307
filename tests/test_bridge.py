"""The visual prefix: PrefixMapper shapes, CNN feature sources, and the jitted image -> prefix -> LM path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgllm.models import cnn as cnn_lib
from imgllm.models.bridge import (PrefixMapper, check_mapper_fits, cnn_outputs, embed_tokens, max_pool_to_grid,
                                  prefixed_token_log_probs, prefixed_token_stats,
                                  whitening_stem_output)
from imgllm.models.lm import GPT2, GPT2Config, init_params

jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="module")
def parts():
  cnn = cnn_lib.CNN(num_classes=4, widths=(8, 16, 16), conv_impl="xla")
  images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  cnn_variables = jax.jit(lambda key: cnn.init(key, images, train=False))(jax.random.key(1))
  lm_config = GPT2Config.tiny(vocab_size=24, bos_token_id=0, eos_token_id=0)
  lm_params = jax.jit(lambda key: init_params(lm_config, key))(jax.random.key(2))
  return cnn, cnn_variables, images, lm_config, lm_params


def test_mapper_shapes_and_errors(parts):
  *_, lm_config, _ = parts
  mapper = PrefixMapper(prefix_length=5, lm_dim=lm_config.n_embd, hidden=16)
  params = mapper.init(jax.random.key(0), jnp.zeros((1, 7)))["params"]
  assert params["fc_1"]["kernel"].shape == (7, 16) and params["fc_2"]["kernel"].shape == (16, 5 * 32)
  assert mapper.apply({"params": params}, jnp.ones((2, 7))).shape == (2, 5, lm_config.n_embd)
  assert PrefixMapper(4, 32).init(jax.random.key(0), jnp.zeros((1, 7)))["params"]["fc_1"]["kernel"].shape == (7, 64)
  with pytest.raises(ValueError, match="features"):
    mapper.apply({"params": params}, jnp.ones((2, 3, 7)))
  with pytest.raises(ValueError, match="n_embd=32"):
    check_mapper_fits(PrefixMapper(4, 64), lm_config)


def test_feature_sources(parts):
  cnn, cnn_variables, images, *_ = parts
  logits, pooled = cnn_outputs(cnn, cnn_variables, images, "pooled")
  reference_logits, reference_features = cnn.apply(cnn_variables, images, train=False)
  np.testing.assert_array_equal(pooled, reference_features)
  spatial_logits, spatial = cnn_outputs(cnn, cnn_variables, images, "spatial")
  np.testing.assert_array_equal(spatial_logits, reference_logits)
  # The last block's map is 3x3x16 for 32x32 inputs; its global max is the pooled feature vector.
  assert spatial.shape == (3, 3 * 3 * 16)
  np.testing.assert_allclose(spatial.reshape(3, 9, 16).max(1), pooled, rtol=1e-6)
  _, pyramid = cnn_outputs(cnn, cnn_variables, images, "pyramid")
  assert pyramid.shape == (3, 3 * 3 * (24 + 8 + 16 + 16))                 # stem + the three blocks
  np.testing.assert_array_equal(pyramid[:, -spatial.shape[1]:], spatial)   # the last block's grid, unpooled
  stem = whitening_stem_output(cnn, cnn_variables, images)
  assert stem.shape == (3, 31, 31, 24)
  np.testing.assert_array_equal(pyramid[:, :3 * 3 * 24], max_pool_to_grid(stem, (3, 3)).reshape(3, -1))
  # The recomputed stem is what the CNN feeds block1: at init block1's first conv is the identity on its first
  # 8 channels (dirac init), so its output there is the stem's.
  _, captured = cnn.apply(cnn_variables, images, train=False, mutable=["intermediates"],
                          capture_intermediates=lambda module, _: module.path == ("block1", "conv1"))
  conv1 = captured["intermediates"]["block1"]["conv1"]["__call__"][0]
  np.testing.assert_allclose(conv1[..., :8], stem[..., :8], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(max_pool_to_grid(jnp.arange(16.0).reshape(1, 4, 4, 1), (2, 2))[0, ..., 0],
                                [[5.0, 7.0], [13.0, 15.0]])
  with pytest.raises(ValueError, match="feature_source='mean'"):
    cnn_outputs(cnn, cnn_variables, images, "mean")


def test_log_probs_match_full_lm_and_ignore_right_padding(parts):
  *_, lm_config, lm_params = parts
  prefix = jax.random.normal(jax.random.key(3), (2, 4, lm_config.n_embd))
  ids = jnp.array([[0, 5, 6, 7, 0, 0], [0, 9, 3, 0, 0, 0]])
  log_probs = prefixed_token_log_probs(lm_params, lm_config, prefix, ids)
  assert log_probs.shape == (2, 5)
  full, _ = GPT2(lm_config).apply({"params": lm_params},
                                  inputs_embeds=jnp.concatenate([prefix, embed_tokens(lm_params, lm_config, ids)], 1))
  expected = jnp.take_along_axis(jax.nn.log_softmax(full[:, 4:-1]), ids[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-5)
  # Changing the padding after a sequence's EOS leaves its real tokens' values unchanged.
  other_padding = ids.at[1, 4:].set(jnp.array([11, 12]))
  np.testing.assert_allclose(prefixed_token_log_probs(lm_params, lm_config, prefix, other_padding)[1, :3],
                             log_probs[1, :3], rtol=1e-6)
  _, is_argmax = prefixed_token_stats(lm_params, lm_config, prefix, ids)
  np.testing.assert_array_equal(is_argmax, jnp.argmax(full[:, 4:-1], -1) == ids[:, 1:])
  with pytest.raises(ValueError, match="prefix_embeds"):
    prefixed_token_log_probs(lm_params, lm_config, prefix[:1], ids)


def test_image_to_caption_likelihood_compiles_once_and_matches_stages(parts):
  cnn, cnn_variables, images, lm_config, lm_params = parts
  mapper = PrefixMapper(prefix_length=3, lm_dim=lm_config.n_embd, feature_source="spatial")
  _, features = cnn_outputs(cnn, cnn_variables, images, mapper.feature_source)
  bridge = mapper.init(jax.random.key(4), features)["params"]
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
  # Stage by stage, each stage run on its own.
  features = jax.jit(lambda v, x: cnn_outputs(cnn, v, x, "spatial")[1])(cnn_variables, images)
  prefix = jax.jit(mapper.apply)({"params": bridge}, features)
  embeds = jnp.concatenate([prefix, embed_tokens(lm_params, lm_config, ids)], 1)
  logits, _ = GPT2(lm_config).apply({"params": lm_params}, inputs_embeds=embeds)
  staged = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 3:-1]), ids[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(fused, staged, rtol=1e-4, atol=1e-4)
