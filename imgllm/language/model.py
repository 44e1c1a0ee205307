"""One interface to every language model imgllm has: GPT-2 and the Llama family, chosen by the config's type.

Decoding (`imgllm.language.decoding`), scoring (`imgllm.language.scoring`), the visual prefix (`imgllm.bridge`) and
training (`imgllm.train`) call only what is here and the few names every LM config answers:

    vocab_size, n_embd (width), n_layer, n_head, n_positions (longest sequence), head_dim, num_cache_heads,
    bos_token_id, eos_token_id, dtype, model_type
    config.module(kernel_out_in)   the flax module: embed_tokens(ids), logits_from_hidden(h), and
                                   __call__(ids | inputs_embeds, attention_mask, position_ids, cache, ...)
    config.with_dropout(rate)      training's dropout
    config.to_dict()               a Hugging Face config.json dict (what pipeline checkpoints store)

So there is one decoding loop, one scorer and one trainer; a model family adds a config and a module.
`config_from_dict` turns a stored config.json dict back into the right config, from a fixed table of model types
(a file names a type from `MODEL_TYPES`, never a class to import).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp

from imgllm.language import gpt2, llama
from imgllm.language.matmul_cpu import OutInParams

LMConfig = Union[gpt2.GPT2Config, llama.LlamaConfig]  # noqa: UP007 (a runtime alias, also for isinstance)

# Hugging Face model_type -> the config class that computes it.
MODEL_TYPES = {"gpt2": gpt2.GPT2Config, **dict.fromkeys(llama.ARCHITECTURES, llama.LlamaConfig)}


def config_from_dict(hf_config: Mapping[str, Any], *, source: str = "config", **overrides) -> LMConfig:
    """The LM config of a Hugging Face config.json dict, by its ``model_type`` (missing: GPT-2, as in pipeline
    checkpoints made before the Llama family); ValueError naming ``source`` for a type imgllm does not have."""
    if not isinstance(hf_config, Mapping):
        raise ValueError(f"{source} must hold a JSON object, not {type(hf_config).__name__}")
    model_type = hf_config.get("model_type", "gpt2")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type={model_type!r} is not one imgllm computes "
            f"(supported: {', '.join(sorted(MODEL_TYPES))})"
        )
    return MODEL_TYPES[model_type].from_dict(hf_config, source=source, **overrides)


def model_and_params(params: Any, config: LMConfig):
    """(the module that reads ``params``, the parameter tree to apply it with): ``config.module()`` for parameters
    as stored ([in, out] kernels), ``config.module(kernel_out_in=True)`` and the unwrapped tree for
    `imgllm.language.matmul_cpu.kernels_out_in` parameters (XLA:CPU's fast path)."""
    if isinstance(params, OutInParams):
        return config.module(kernel_out_in=True), params.params
    return config.module(), params


def init_params(config: LMConfig, rng: jax.Array) -> dict:
    """Randomly initialised parameters of the model of ``config``."""
    return jax.jit(config.module().init)(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def initial_params(config: LMConfig, rng: jax.Array, *, pretrained: bool = False) -> dict:
    """The parameters a training run starts from before its weights are put in place: random (`init_params`), or,
    when pretrained weights will replace them, zeros of the same shapes (no initialiser is compiled or run)."""
    if pretrained:
        return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract_params(config))
    return init_params(config, rng)


def abstract_params(config: LMConfig) -> dict:
    """The parameter tree (`jax.ShapeDtypeStruct` leaves) of the model of ``config``, without computing it."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def embed_tokens(params: Any, config: LMConfig, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, T, D] of ``input_ids`` [B, T]."""
    model, params = model_and_params(params, config)
    return model.apply({"params": params}, input_ids, method="embed_tokens")


def logits_from_hidden(params: Any, config: LMConfig, hidden: jax.Array) -> jax.Array:
    """The output head: final hidden states [..., D] -> float32 logits [..., V]."""
    model, params = model_and_params(params, config)
    return model.apply({"params": params}, hidden, method="logits_from_hidden")


def hidden_states(
    params: Any,
    config: LMConfig,
    inputs_embeds: jax.Array,
    *,
    attention_mask=None,
    position_ids=None,
    cache=None,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
):
    """(final hidden states [B, T, D], new cache or None) of embeddings [B, T, D] (the head is not applied)."""
    model, params = model_and_params(params, config)
    rngs = {} if deterministic else {"dropout": dropout_rng}
    return model.apply(
        {"params": params},
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        deterministic=deterministic,
        return_hidden=True,
        rngs=rngs,
    )
