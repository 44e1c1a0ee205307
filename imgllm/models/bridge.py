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

from imgllm.models.cnn import conv2d
from imgllm.models.lm import GPT2, GPT2Config, bind


FEATURE_SOURCES = ("pooled", "spatial", "pyramid")


class PrefixMapper(nn.Module):
    """MLP features [B, F] -> prefix embeddings [B, prefix_length, lm_dim].

    LayerNorm on the input (CNN features have an arbitrary scale), Dense(hidden) + tanh, Dense(K * D) reshaped to
    [K, D] (ClipCap's MLP mapper). hidden=0 means ClipCap's default K * D // 2.
    feature_source names the CNN features it reads (see `cnn_outputs`): "pooled", the CNN's returned features
    (global max-pool: position-free); "spatial", its last block's feature map flattened (keeps where things
    are, which captions such as "on the left" need); or "pyramid", the whitening stem's output and every conv block's
    map, each max-pooled to the last block's grid and concatenated (the early stages keep what a shape classifier's
    last block drops: on the demo shapes a linear probe reads the colour from 25% of the pooled features, 62% of
    the conv blocks' maps and 96-99% of the stem's).
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

    "spatial" and "pyramid" capture the outputs of the CNN's conv blocks (named `block1`..`block{len(widths)}`)
    with flax's capture_intermediates, so the CNN module needs no change. F = h * w * channels of the last block
    ("spatial"), or h * w * (whiten_width + sum(widths)) ("pyramid", see `whitening_stem_output`).
    """
    if feature_source not in FEATURE_SOURCES:
        raise ValueError(f"feature_source={feature_source!r}: expected one of {FEATURE_SOURCES}")
    if feature_source == "pooled":
        return cnn.apply(cnn_variables, images_normalised, train=False)
    blocks = [f"block{i + 1}" for i in range(len(cnn.widths))]
    wanted = blocks if feature_source == "pyramid" else blocks[-1:]
    (logits, _), captured = cnn.apply(cnn_variables, images_normalised, train=False,
                                      capture_intermediates=lambda module, _: module.name in wanted,
                                      mutable=["intermediates"])
    maps = [captured["intermediates"][name]["__call__"][0] for name in wanted]
    if feature_source == "pyramid":
        maps.insert(0, whitening_stem_output(cnn, cnn_variables, images_normalised))
    grid = maps[-1].shape[1:3]
    features = [max_pool_to_grid(feature_map, grid).reshape(feature_map.shape[0], -1) for feature_map in maps]
    return logits, jnp.concatenate(features, axis=-1)


def whitening_stem_output(cnn: nn.Module, cnn_variables: Any, images_normalised: jax.Array) -> jax.Array:
    """The CNN's whitening stem, GELU(conv2x2_VALID(x, whiten_kernel) + whiten_bias): [B, H-1, W-1, whiten_width].

    The stem is not a submodule of the CNN (capture_intermediates cannot see it), so it is recomputed here from
    the CNN's own parameters with its own conv2d; it is what CNN.__call__ computes before `block1`.
    """
    params = cnn_variables["params"]
    x = conv2d(images_normalised.astype(cnn.dtype), params["whiten_kernel"].astype(cnn.dtype), padding="VALID",
               impl=cnn.conv_impl)
    return nn.gelu(x + params["whiten_bias"].astype(cnn.dtype), approximate=False)


def max_pool_to_grid(feature_map: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Max-pools [B, H, W, C] to [B, gh, gw, C] over equal windows (H // gh, W // gw), dropping the remainder."""
    batch, height, width, channels = feature_map.shape
    wh, ww = height // grid[0], width // grid[1]
    cropped = feature_map[:, :wh * grid[0], :ww * grid[1]]
    return cropped.reshape(batch, grid[0], wh, grid[1], ww, channels).max(axis=(2, 4))


def check_mapper_fits(mapper: PrefixMapper, lm_config: GPT2Config) -> None:
    """Raises ValueError when the mapper's output width is not the LM's embedding width."""
    if mapper.lm_dim != lm_config.n_embd:
        raise ValueError(f"PrefixMapper.lm_dim={mapper.lm_dim} but the language model has n_embd={lm_config.n_embd}")


def embed_tokens(lm_params: Any, lm_config: GPT2Config, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] from the LM's wte table."""
    model, lm_params = bind(lm_params, lm_config)
    return model.apply({"params": lm_params}, input_ids, method=GPT2.embed_tokens)


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
    embeds = embed_tokens(lm_params, lm_config, input_ids)
    model, lm_params = bind(lm_params, lm_config)
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
