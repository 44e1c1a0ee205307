"""The visual prefix: a mapping network from CNN features to k LM input embeddings (ClipCap, Mokady et al. 2021).

    CNN features [B, F] -> PrefixMapper -> prefix [B, K, D]

The LM then reads [prefix ; embed(BOS, t_1, ..., t_n)] (`imgllm.language.scoring.prefixed_token_stats` for
log p(t_i | prefix, BOS, t_<i), `imgllm.language.decoding.generate_tokens(..., prefix_embeds=)` for captions).

Convention shared by training, scoring and generation: text after the prefix always starts with BOS (GPT-2's
`<|endoftext|>`), so the model is trained on [prefix][BOS][caption][EOS] and generation is prompted with
[prefix][BOS]. Position ids run 0..K+T-1 over prefix and text (no padding inside), for GPT-2's learned positions
and the Llama family's rotary ones alike (`imgllm.language.model`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from imgllm.language.model import LMConfig


class PrefixMapper(nn.Module):
    """MLP features [B, F] -> prefix embeddings [B, prefix_length, lm_dim].

    LayerNorm on the input (CNN features have an arbitrary scale), Dense(hidden) + tanh, Dense(K * D) reshaped to
    [K, D] (ClipCap's MLP mapper). hidden=0 means ClipCap's default K * D // 2.
    feature_source names the CNN features it reads (`imgllm.vision.features`): "pooled", the CNN's returned features
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
            raise ValueError(
                f"PrefixMapper needs positive prefix_length and lm_dim, got {self.prefix_length}, {self.lm_dim}"
            )
        width = self.prefix_length * self.lm_dim
        x = nn.LayerNorm(dtype=self.dtype, name="ln_in")(features.astype(self.dtype))
        x = jnp.tanh(nn.Dense(self.hidden or width // 2, dtype=self.dtype, name="fc_1")(x))
        x = nn.Dense(width, dtype=self.dtype, name="fc_2")(x)
        return x.reshape(features.shape[0], self.prefix_length, self.lm_dim).astype(jnp.float32)


def check_mapper_fits(mapper: PrefixMapper, lm_config: LMConfig) -> None:
    """Raises ValueError when the mapper's output width is not the LM's embedding width."""
    if mapper.lm_dim != lm_config.n_embd:
        raise ValueError(f"PrefixMapper.lm_dim={mapper.lm_dim} but the language model has n_embd={lm_config.n_embd}")
