"""The visual prefix: a mapping network from CNN features to k LM input embeddings (ClipCap, Mokady et al. 2021).

Data flow (one jitted function from image to caption log-likelihoods or tokens):

    CNN features [B, F] -> PrefixMapper -> prefix [B, K, D]
    [prefix ; embed(BOS, t_1, ..., t_n)] -> GPT2 -> log p(t_i | prefix, BOS, t_<i)

Convention shared by training, scoring and generation: text after the prefix always starts with BOS (GPT-2's
`<|endoftext|>`), so the model is trained on [prefix][BOS][caption][EOS] and generation is prompted with
[prefix][BOS]. Position ids run 0..K+T-1 over prefix and text, as GPT2's default (no padding inside).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgllm.models.lm import GPT2, GPT2Config


FEATURE_SOURCES = ("pooled", "spatial")


class PrefixMapper(nn.Module):
  """MLP features [B, F] -> prefix embeddings [B, prefix_length, lm_dim].

  LayerNorm on the input (CNN features have an arbitrary scale), Dense(hidden) + tanh, Dense(K * D) reshaped to
  [K, D] (ClipCap's MLP mapper). hidden=0 means ClipCap's default K * D // 2.
  feature_source names the CNN features it reads (see `cnn_outputs`): "pooled", the CNN's returned features
  (global max-pool: position-free), or "spatial", its last block's feature map flattened (keeps where things
  are, which captions such as "on the left" need).
  """

  prefix_length: int
  lm_dim: int
  hidden: int = 0
  feature_source: str = "pooled"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    if features.ndim != 2:
      raise ValueError(f"PrefixMapper expects features [batch, F], got shape {features.shape}")
    if self.prefix_length <= 0 or self.lm_dim <= 0:
      raise ValueError(f"PrefixMapper needs positive prefix_length and lm_dim, got {self.prefix_length}, "
                       f"{self.lm_dim}")
    width = self.prefix_length * self.lm_dim
    x = nn.LayerNorm(dtype=self.dtype, name="ln_in")(features.astype(self.dtype))
    x = jnp.tanh(nn.Dense(self.hidden or width // 2, dtype=self.dtype, name="fc_1")(x))
    x = nn.Dense(width, dtype=self.dtype, name="fc_2")(x)
    return x.reshape(features.shape[0], self.prefix_length, self.lm_dim).astype(jnp.float32)


def cnn_outputs(cnn: nn.Module, cnn_variables: Any, images_normalised: jax.Array,
                feature_source: str = "pooled") -> tuple[jax.Array, jax.Array]:
  """(logits [B, C], features [B, F]) of the CNN in inference mode, features as `feature_source` says.

  "spatial" captures the output of the CNN's last conv block (named `block{len(widths)}`, before the global
  pool) with flax's capture_intermediates, so the CNN module needs no change; F = h * w * channels.
  """
  if feature_source not in FEATURE_SOURCES:
    raise ValueError(f"feature_source={feature_source!r}: expected one of {FEATURE_SOURCES}")
  if feature_source == "pooled":
    return cnn.apply(cnn_variables, images_normalised, train=False)
  last_block = f"block{len(cnn.widths)}"
  (logits, _), captured = cnn.apply(cnn_variables, images_normalised, train=False,
                                    capture_intermediates=lambda module, _: module.name == last_block,
                                    mutable=["intermediates"])
  feature_map = captured["intermediates"][last_block]["__call__"][0]
  return logits, feature_map.reshape(feature_map.shape[0], -1)


def check_mapper_fits(mapper: PrefixMapper, lm_config: GPT2Config) -> None:
  """Raises ValueError when the mapper's output width is not the LM's embedding width."""
  if mapper.lm_dim != lm_config.n_embd:
    raise ValueError(f"PrefixMapper.lm_dim={mapper.lm_dim} but the language model has n_embd={lm_config.n_embd}")


def embed_tokens(lm_params: Any, lm_config: GPT2Config, input_ids: jax.Array) -> jax.Array:
  """Token embeddings [B, T, D] from the LM's wte table."""
  return GPT2(lm_config).apply({"params": lm_params}, input_ids, method=GPT2.embed_tokens)


def prefixed_token_log_probs(lm_params: Any, lm_config: GPT2Config, prefix_embeds: jax.Array | None,
                             input_ids: jax.Array, *, deterministic: bool = True,
                             dropout_rng: jax.Array | None = None) -> jax.Array:
  """log p(input_ids[:, t] | prefix, input_ids[:, :t]) for t = 1..T-1, as float32 [B, T-1] (see
  `prefixed_token_stats`)."""
  return prefixed_token_stats(lm_params, lm_config, prefix_embeds, input_ids, deterministic=deterministic,
                              dropout_rng=dropout_rng)[0]


def prefixed_token_stats(lm_params: Any, lm_config: GPT2Config, prefix_embeds: jax.Array | None,
                         input_ids: jax.Array, *, deterministic: bool = True,
                         dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(log p(input_ids[:, t] | prefix, input_ids[:, :t]), whether that token is the argmax), each [B, T-1].

  The argmax flags give greedy-decoding agreement under teacher forcing: greedy decoding after [prefix][BOS]
  reproduces a reference exactly iff every one of its tokens (and its EOS) is the argmax.

  input_ids [B, T] start with BOS and are right-padded (pads only follow real tokens, so causal attention never
  lets a real token see them; callers mask the pad positions' values). prefix_embeds [B, K, D] or None (K = 0:
  plain text). The LM head is applied only to the text positions, never to the prefix.
  """
  if input_ids.ndim != 2 or input_ids.shape[1] < 2:
    raise ValueError(f"input_ids must be [batch, length >= 2] (BOS + tokens), got shape {input_ids.shape}")
  model = GPT2(lm_config)
  embeds = embed_tokens(lm_params, lm_config, input_ids)
  prefix_length = 0
  if prefix_embeds is not None:
    if prefix_embeds.ndim != 3 or prefix_embeds.shape[0] != input_ids.shape[0]:
      raise ValueError(f"prefix_embeds must be [{input_ids.shape[0]}, K, D], got shape {prefix_embeds.shape}")
    prefix_length = prefix_embeds.shape[1]
    embeds = jnp.concatenate([prefix_embeds.astype(embeds.dtype), embeds], axis=1)
  rngs = {} if deterministic else {"dropout": dropout_rng}
  hidden, _ = model.apply({"params": lm_params}, inputs_embeds=embeds, deterministic=deterministic,
                          return_hidden=True, rngs=rngs)
  predicting = hidden[:, prefix_length:-1]           # text positions 0..T-2 predict tokens 1..T-1
  logits = model.apply({"params": lm_params}, predicting, method=GPT2.logits_from_hidden)
  targets = input_ids[:, 1:]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  is_argmax = jnp.argmax(logits, axis=-1) == targets
  return target_logits - jax.nn.logsumexp(logits, axis=-1), is_argmax
