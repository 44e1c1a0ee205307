"""The Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2) as one decoder in flax.linen.

Pre-RMSNorm blocks with rotary position embeddings, grouped-query attention and a SwiGLU MLP:

    x = embed(tokens)
    for each layer:  x = x + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = rmsnorm(x)
                     x = x + down_proj(silu(gate_proj(n)) * up_proj(n)),                       n = rmsnorm(x)
    logits = rmsnorm(x) @ head   (the embedding itself when tied, else lm_head)

The parameter tree is a rename of a Hugging Face ``LlamaForCausalLM`` state dict (`imgllm.language.llama_weights`):

    embed/embedding [V, D]                            model.embed_tokens.weight
    layers_{i}/input_layernorm/scale [D]              model.layers.{i}.input_layernorm.weight
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel        model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (transposed)
    layers_{i}/self_attn/{q,k,v}_proj/bias            ... .bias (Qwen2; Llama's attention_bias also has o_proj's)
    layers_{i}/post_attention_layernorm/scale [D]     model.layers.{i}.post_attention_layernorm.weight
    layers_{i}/mlp/{gate,up,down}_proj/kernel         model.layers.{i}.mlp.{gate,up,down}_proj.weight (transposed)
    norm/scale [D]                                    model.norm.weight
    lm_head/kernel [D, V]                             lm_head.weight (transposed), only when not tied

Kernels are flax's [in, out] (PyTorch's Linear stores [out, in]). Rotary embeddings follow Hugging Face's
``rotate_half`` layout (the two halves of each head are the pairs); GGUF files store Q/K rows interleaved, which
`imgllm.language.gguf_file` undoes on loading. The KV cache holds only the key/value heads (`LlamaConfig.
num_cache_heads`); the query heads of a group read their shared key/value head without copying it.

The module's interface is GPT-2's (`imgllm.language.model`): ``embed_tokens``, ``logits_from_hidden`` and a call
with ids or embeddings, a mask, position ids and a cache, so decoding, scoring, the visual prefix and training use
one code path for both.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imgllm.language.cache import KVCache, call_layout, check_call_inputs, run_layers, write_cache
from imgllm.language.matmul_cpu import OutInDense

# The Hugging Face model types this module computes exactly, with their causal-LM class names.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Rotary scalings implemented here (Hugging Face's rope_type); "default" is none.
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _freeze(mapping: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    """A rope-scaling dict as a sorted tuple of items (hashable: the config is a static jit argument)."""
    return None if mapping is None else tuple(sorted(dict(mapping).items()))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes and variant of a Llama-family model (Hugging Face ``config.json`` names) and the compute dtype.

    ``rope_scaling`` is None or the sorted items of Hugging Face's rope-scaling dict (``rope_type`` "linear" with
    ``factor``, or "llama3" with factor, low/high_freq_factor, original_max_position_embeddings). ``qkv_bias`` and
    ``o_bias``: biases of the attention projections (Qwen2: q/k/v only; Llama's ``attention_bias``: all four).
    ``sliding_window`` (Mistral): sequences are limited to it, where a sliding window changes nothing.
    ``dtype`` is the compute dtype; parameters are float32 and logits float32. Frozen and hashable.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0  # 0: as many as num_attention_heads
    head_dim_override: int = 0  # config.json "head_dim"; 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int = 2
    architecture: str = "llama"
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"LlamaConfig.architecture must be one of {sorted(ARCHITECTURES)}, got {self.architecture!r}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            _check_positive_int(f"LlamaConfig.{name}", getattr(self, name))
        for name in ("num_key_value_heads", "head_dim_override"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LlamaConfig.{name} must be a non-negative integer, got {value!r}")
        if self.num_attention_heads % self.num_cache_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_cache_heads}"
            )
        if not self.head_dim_override and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads} (give head_dim)"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig head_dim={self.head_dim} must be even (rotary embeddings rotate pairs)")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"LlamaConfig.{name} must be a finite positive number, got {value!r}")
        if self.sliding_window is not None:
            _check_positive_int("LlamaConfig.sliding_window", self.sliding_window)
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None and name == "bos_token_id":
                continue
            if not isinstance(value, (int, np.integer)) or not 0 <= value < self.vocab_size:
                raise ValueError(f"LlamaConfig.{name}={value!r} is outside the vocabulary [0, {self.vocab_size})")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"LlamaConfig.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"LlamaConfig.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        rope_frequencies(self)  # a bad rope_scaling is named now

    # -- the interface every LM config answers (`imgllm.language.model`) --
    @property
    def model_type(self) -> str:
        return self.architecture

    @property
    def n_embd(self) -> int:
        """The model width (the visual prefix's and the embeddings' last dimension)."""
        return self.hidden_size

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def n_positions(self) -> int:
        """The longest sequence (prefix + prompt + new tokens): max_position_embeddings, within a sliding window."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def num_cache_heads(self) -> int:
        """Key/value heads: what the KV cache holds (fewer than the query heads with grouped-query attention)."""
        return self.num_key_value_heads or self.num_attention_heads

    def module(self, kernel_out_in: bool = False) -> Llama:
        """The flax module of this config (`imgllm.language.model.model_and_params` picks ``kernel_out_in``)."""
        return Llama(self, kernel_out_in=kernel_out_in)

    def with_dropout(self, rate: float) -> LlamaConfig:
        """This config with attention dropout ``rate`` (Llama has no other dropout; training's runtime choice)."""
        return dataclasses.replace(self, attention_dropout=rate)

    # -- Hugging Face config.json --
    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dictionary for ``ARCHITECTURES[architecture]`` (dtype is not saved).

        Rotary settings are written both as transformers 5's ``rope_parameters`` and as the older ``rope_theta`` /
        ``rope_scaling`` keys, so either generation of transformers reads them."""
        rope = {"rope_type": "default"} if self.rope_scaling is None else dict(self.rope_scaling)
        out = {
            "model_type": self.architecture,
            "architectures": [ARCHITECTURES[self.architecture]],
            "vocab_size": int(self.vocab_size),
            "hidden_size": int(self.hidden_size),
            "intermediate_size": int(self.intermediate_size),
            "num_hidden_layers": int(self.num_hidden_layers),
            "num_attention_heads": int(self.num_attention_heads),
            "num_key_value_heads": int(self.num_cache_heads),
            "head_dim": int(self.head_dim),
            "max_position_embeddings": int(self.max_position_embeddings),
            "rms_norm_eps": float(self.rms_norm_eps),
            "rope_theta": float(self.rope_theta),
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rope_parameters": {**rope, "rope_theta": float(self.rope_theta)},
            "tie_word_embeddings": bool(self.tie_word_embeddings),
            "hidden_act": "silu",
            "bos_token_id": None if self.bos_token_id is None else int(self.bos_token_id),
            "eos_token_id": int(self.eos_token_id),
            "attention_dropout": float(self.attention_dropout),
            "initializer_range": float(self.initializer_range),
        }
        if self.architecture == "qwen2":
            out["use_sliding_window"] = False
        else:
            out["attention_bias"] = bool(self.qkv_bias)
            out["mlp_bias"] = bool(self.mlp_bias)
        if self.architecture == "mistral":
            out["sliding_window"] = self.sliding_window
        return out

    @classmethod
    def from_dict(cls, hf_config: Mapping[str, Any], *, source: str = "config", **overrides) -> LlamaConfig:
        """Builds a config from a Hugging Face Llama, Mistral or Qwen2 ``config.json`` dictionary.

        Raises ValueError naming ``source`` and the key when the dictionary describes a model this implementation
        would compute differently (another activation, a rotary scaling or sliding-window scheme not implemented
        here, partial rotary embeddings). Unknown keys are ignored. ``overrides`` set fields such as dtype.
        """
        try:
            return cls(**{**_fields_from_hf(hf_config, source), **overrides})
        except (TypeError, ValueError) as error:
            message = str(error)
            raise ValueError(message if message.startswith(source) else f"{source}: {message}") from None


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _rope_settings(hf_config: Mapping[str, Any], source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling dict or None) from transformers 5's ``rope_parameters`` and/or the older
    ``rope_theta`` / ``rope_scaling`` keys (when both are there they must agree)."""
    params, scaling = hf_config.get("rope_parameters"), hf_config.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{source}: {key}={value!r} must be an object or null")
    theta = hf_config.get("rope_theta")
    if params is not None and params.get("rope_theta") is not None:
        if theta is not None and theta != params["rope_theta"]:
            raise ValueError(
                f"{source}: rope_theta={theta!r} disagrees with rope_parameters.rope_theta={params['rope_theta']!r}"
            )
        theta = params["rope_theta"]
    rope = None if scaling is None else _rope_scaling(scaling, source)
    if params is not None:
        from_params = _rope_scaling({k: v for k, v in params.items() if k != "rope_theta"}, source)
        if scaling is not None and from_params != rope:
            raise ValueError(
                f"{source}: rope_scaling={dict(scaling)!r} disagrees with rope_parameters={dict(params)!r}"
            )
        rope = from_params
    return (10000.0 if theta is None else theta), rope


def _rope_scaling(scaling: Mapping[str, Any], source: str) -> dict | None:
    """A rope-scaling dict checked and reduced to the keys that change the frequencies; None for no scaling."""
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))  # "type": the oldest spelling
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: rope_type={rope_type!r} is not supported (only {', '.join(ROPE_TYPES)})")
    keys = {"default": (), "linear": ("factor",), "llama3": _LLAMA3_ROPE_KEYS}[rope_type]
    missing = [key for key in keys if key not in scaling]
    if missing:
        raise ValueError(f"{source}: rope scaling {rope_type!r} needs {missing[0]!r}")
    for key in keys:
        value = scaling[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"{source}: rope scaling {key}={value!r} must be a finite positive number")
    return None if rope_type == "default" else {"rope_type": rope_type, **{key: scaling[key] for key in keys}}


def _fields_from_hf(hf_config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """LlamaConfig fields from a config.json dict, refusing (naming the key) what would be computed differently."""
    if not isinstance(hf_config, Mapping):
        raise ValueError(f"{source} must hold a JSON object, not {type(hf_config).__name__}")
    architecture = hf_config.get("model_type")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{source}: model_type={architecture!r}, expected one of {sorted(ARCHITECTURES)}")
    activation = hf_config.get("hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"{source}: hidden_act={activation!r}, only 'silu' (SwiGLU) is supported")
    if hf_config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor={hf_config['partial_rotary_factor']!r} is not supported")
    if hf_config.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")
    theta, rope = _rope_settings(hf_config, source)
    fields = dict(architecture=architecture, rope_theta=theta, rope_scaling=_freeze(rope))
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "initializer_range",
        "attention_dropout",
    ):
        if hf_config.get(key) is not None:
            fields[key] = hf_config[key]
    if "bos_token_id" in hf_config:  # null: the model has no BOS token (Qwen2)
        fields["bos_token_id"] = hf_config["bos_token_id"]
    head_dim, width, heads = (hf_config.get(key) for key in ("head_dim", "hidden_size", "num_attention_heads"))
    if head_dim is not None and not (
        isinstance(width, int) and isinstance(heads, int) and heads > 0 and width == head_dim * heads
    ):
        fields["head_dim_override"] = head_dim  # only where it is not the default, so equal models compare equal
    eos = hf_config.get("eos_token_id")
    if isinstance(eos, list):  # Llama 3 lists several end tokens; generation stops at the first
        eos = eos[0] if eos else None
    if eos is not None:
        fields["eos_token_id"] = eos
    fields["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings", False))  # transformers' default
    if architecture == "qwen2":
        fields.update(qkv_bias=True, o_bias=False)
    else:
        fields.update(
            qkv_bias=bool(hf_config.get("attention_bias", False)),
            o_bias=bool(hf_config.get("attention_bias", False)),
            mlp_bias=bool(hf_config.get("mlp_bias", False)),
        )
    if architecture == "mistral" and hf_config.get("sliding_window") is not None:
        fields["sliding_window"] = hf_config["sliding_window"]
    return fields


# ---------------------------------------------------------------------------------------------- rotary embeddings


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """The rotary inverse frequencies [head_dim / 2] (float32, host constants), with Llama 3's or linear scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = dict(config.rope_scaling or {})
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, **{key: scaling[key] for key in _LLAMA3_ROPE_KEYS})
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported (only {', '.join(ROPE_TYPES)})")
    return inv_freq


def _llama3_frequencies(
    inv_freq: np.ndarray,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """Llama 3.1's frequency scaling: long wavelengths divided by factor, short ones kept, a smooth blend between."""
    if high_freq_factor <= low_freq_factor:
        raise ValueError(
            f"rope scaling high_freq_factor={high_freq_factor} must exceed low_freq_factor={low_freq_factor}"
        )
    context = float(original_max_position_embeddings)
    wavelength = 2 * np.pi / inv_freq
    scaled = np.where(wavelength > context / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high_freq_factor) & (wavelength <= context / low_freq_factor)
    return np.where(medium, blended, scaled).astype(np.float32)


def rotary_cos_sin(config: LlamaConfig, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, head_dim] (float32) of every position's rotation angles, halves repeated."""
    angles = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(config))
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, Dh] rotated pairwise (first half with second half, Hugging Face's rotate_half), in float32."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    return (x32 * cos + jnp.concatenate([-second, first], axis=-1) * sin).astype(x.dtype)


# ---------------------------------------------------------------------------------------------- layers


def _dense(
    features: int, config: LlamaConfig, name: str, kernel_out_in: bool, use_bias: bool, float32_out: bool = False
) -> nn.Module:
    """A projection y = x @ kernel (+ bias): ``nn.Dense`` with its kernel [in, out] (the plain path), or
    `matmul_cpu.OutInDense` for [out, in] kernels (`kernels_out_in`). float32_out: the product accumulates and is
    returned in float32 (the output head: logits rounded to bfloat16 are 0.125 apart at 20)."""
    init = nn.initializers.normal(config.initializer_range)
    if kernel_out_in:
        return OutInDense(features, use_bias=use_bias, dtype=config.dtype, kernel_init=init, name=name)
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32) if float32_out else None
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=config.dtype,
        param_dtype=jnp.float32,
        kernel_init=init,
        name=name,
        **({"dot_general": dot} if dot else {}),
    )


class RMSNorm(nn.Module):
    """x / rms(x) * scale, the statistic in float32 (as Hugging Face's LlamaRMSNorm), the result in ``dtype``."""

    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with rotary positions; writes its key/value heads into the cache."""

    config: LlamaConfig
    kernel_out_in: bool = False

    @nn.compact
    def __call__(self, x, bias, kv, index, position_ids, deterministic=True):
        """x [B,T,D]; bias [B,1,T,S]; kv: None or this layer's cache (k, v), each [B, Hkv, S, Dh]; position_ids
        [B,T]. Returns (output [B,T,D], new (k, v) or None)."""
        cfg = self.config
        batch, length, _ = x.shape
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_cache_heads, cfg.head_dim
        project = lambda n, name, use_bias: _dense(n * dim, cfg, name, self.kernel_out_in, use_bias)(x).reshape(
            batch, length, n, dim
        )
        q = project(heads, "q_proj", cfg.qkv_bias)
        k = project(kv_heads, "k_proj", cfg.qkv_bias)
        v = project(kv_heads, "v_proj", cfg.qkv_bias)
        cos, sin = rotary_cos_sin(cfg, position_ids)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, heads, T, Dh]
        k, v, kv = write_cache(kv, k, v, index)
        # Query head h reads key/value head h // group: group the query heads, never copy the keys.
        q = q.reshape(batch, kv_heads, heads // kv_heads, length, dim)
        k, v = k.astype(q.dtype), v.astype(cfg.dtype)
        dropout = nn.Dropout(cfg.attention_dropout)
        if length == 1:  # a decoding step: no query axis in the products (half the attention time on XLA:CPU)
            scores = jnp.einsum("bkgd,bksd->bkgs", q[:, :, :, 0], k, preferred_element_type=jnp.float32)
            weights = _attention_weights(scores, bias[:, :, 0, None, :], dim, cfg.dtype)
            out = jnp.einsum("bkgs,bksd->bkgd", dropout(weights, deterministic=deterministic), v)
        else:  # heads first in the output product, then one transpose (the [B, T, heads] output order is slow)
            scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
            weights = _attention_weights(scores, bias[:, :, None], dim, cfg.dtype)
            out = jnp.einsum("bkgts,bksd->bkgtd", dropout(weights, deterministic=deterministic), v)
            out = out.transpose(0, 3, 1, 2, 4)
        out = out.reshape(batch, length, heads * dim)
        return _dense(cfg.hidden_size, cfg, "o_proj", self.kernel_out_in, cfg.o_bias)(out), kv


def _attention_weights(scores: jax.Array, bias: jax.Array, dim: int, dtype: Any) -> jax.Array:
    """softmax(scores / sqrt(dim) + bias) over the last axis, in float32, returned in the compute dtype."""
    return jax.nn.softmax(scores / jnp.float32(math.sqrt(dim)) + bias, axis=-1).astype(dtype)


class LlamaMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    config: LlamaConfig
    kernel_out_in: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda features, name: _dense(features, cfg, name, self.kernel_out_in, cfg.mlp_bias)
        hidden = nn.silu(dense(cfg.intermediate_size, "gate_proj")(x)) * dense(cfg.intermediate_size, "up_proj")(x)
        return dense(cfg.hidden_size, "down_proj")(hidden)


class LlamaBlock(nn.Module):
    """x + attention(rmsnorm(x)), then x + mlp(rmsnorm(x))."""

    config: LlamaConfig
    kernel_out_in: bool = False

    @nn.compact
    def __call__(self, x, bias, kv=None, index=None, position_ids=None, deterministic=True):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, name=name)
        attn_out, kv = LlamaAttention(cfg, self.kernel_out_in, name="self_attn")(
            norm("input_layernorm")(x), bias, kv, index, position_ids, deterministic
        )
        x = x + attn_out
        x = x + LlamaMLP(cfg, self.kernel_out_in, name="mlp")(norm("post_attention_layernorm")(x))
        return x, kv


class Llama(nn.Module):
    """A Llama-family causal language model, called as `imgllm.language.gpt2.GPT2` is.

    Call with token ids or input embeddings (e.g. a visual prefix followed by embedded prompt tokens). Without a
    cache, attention is causal over the T inputs and masked by attention_mask [B, T]; with a cache of S slots the T
    inputs are written at slots [index, index + T) and attend to every earlier slot with attention_mask[B, S] == 1.
    position_ids [B, T] are the rotary positions (left padding: cumsum(mask) - 1, as transformers).
    ``kernel_out_in``: kernels stored [out, in] (`matmul_cpu.kernels_out_in`, XLA:CPU's fast path).
    """

    config: LlamaConfig
    kernel_out_in: bool = False

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
        )
        # A list attribute set in setup names its modules layers_0 .. layers_{L-1}, as model.layers.{i}.
        self.layers = [LlamaBlock(cfg, self.kernel_out_in) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, cfg, None, self.kernel_out_in, use_bias=False, float32_out=True)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, D], e.g. to concatenate after a visual prefix."""
        return self.embed(input_ids)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states [..., D] -> float32 logits [..., V]: the tied embedding read as stored ([V, D], a
        dot over both last axes, as GPT-2's head), or lm_head."""
        dtype = self.config.dtype
        if self.config.tie_word_embeddings:
            logits = jax.lax.dot_general(
                hidden.astype(dtype),
                self.embed.embedding.astype(dtype),
                (((hidden.ndim - 1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
        else:
            logits = self.lm_head(hidden.astype(dtype))
        return logits.astype(jnp.float32)

    def __call__(
        self,
        input_ids=None,
        *,
        inputs_embeds=None,
        attention_mask=None,
        position_ids=None,
        cache: KVCache | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ):
        """Returns (logits [B, T, V] float32, new cache or None); (final hidden [B, T, D], cache) when
        return_hidden."""
        check_call_inputs(input_ids, inputs_embeds, self.config.hidden_size)
        x = self.embed_tokens(input_ids) if input_ids is not None else inputs_embeds
        x = x.astype(jnp.float32)  # the residual stream is float32 in any compute dtype
        layout = call_layout(self.config, x.shape[0], x.shape[1], attention_mask, position_ids, cache)
        x, new_cache = run_layers(self.layers, x, layout, cache, deterministic)
        hidden = self.norm(x)
        if return_hidden:
            return hidden, new_cache
        return self.logits_from_hidden(hidden), new_cache
