"""GPT-2 decoder-only transformer in flax.linen, with a parameter tree that mirrors Hugging Face GPT-2.

The parameter tree is a rename of a Hugging Face ``GPT2LMHeadModel`` state dict (``imgllm/language/hf.py`` does it):

    wte/embedding [V, D]               transformer.wte.weight
    wpe/embedding [N, D]               transformer.wpe.weight
    h_{i}/ln_1/{scale, bias}           transformer.h.{i}.ln_1.{weight, bias}
    h_{i}/attn/c_attn/{kernel, bias}   transformer.h.{i}.attn.c_attn.{weight, bias}   kernel [D, 3D]
    h_{i}/attn/c_proj/{kernel, bias}   transformer.h.{i}.attn.c_proj.{weight, bias}   kernel [D, D]
    h_{i}/ln_2/{scale, bias}           transformer.h.{i}.ln_2.{weight, bias}
    h_{i}/mlp/c_fc/{kernel, bias}      transformer.h.{i}.mlp.c_fc.{weight, bias}      kernel [D, 4D]
    h_{i}/mlp/c_proj/{kernel, bias}    transformer.h.{i}.mlp.c_proj.{weight, bias}    kernel [4D, D]
    ln_f/{scale, bias}                 transformer.ln_f.{weight, bias}

HF's ``Conv1D`` stores its weight as ``[in, out]``, exactly a flax ``Dense`` kernel, so no transpose is needed.
The output head is tied to ``wte`` (``lm_head.weight`` is ``transformer.wte.weight``).

Decoding uses the explicit, functional key/value cache of `imgllm.language.cache`; `imgllm.language.model` is the
one interface that decoding, scoring and training use for GPT-2 and the Llama family alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imgllm.language.cache import KVCache, call_layout, check_call_inputs, run_layers, write_cache
from imgllm.language.matmul_cpu import OutInDense

# Hugging Face config.json keys that change GPT-2's math, with the only value this implementation supports.
_UNSUPPORTED_HF_FLAGS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Sizes of a GPT-2 model (Hugging Face ``config.json`` names) and the compute dtype.

    ``dtype`` is the dtype of activations and matmuls (float32, or bfloat16 for speed); parameters are always
    stored in float32 and logits are returned in float32. Frozen and hashable: it is a static jit argument.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"GPT2Config.{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if jnp.dtype(self.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"GPT2Config.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def model_type(self) -> str:
        """The Hugging Face ``model_type`` (`imgllm.language.model` dispatches on the config's class)."""
        return "gpt2"

    @property
    def num_cache_heads(self) -> int:
        """Heads whose keys and values the KV cache holds: all of them."""
        return self.n_head

    def module(self, kernel_out_in: bool = False) -> GPT2:
        """The flax module of this config (`imgllm.language.model.model_and_params` picks ``kernel_out_in``)."""
        return GPT2(self, kernel_out_in=kernel_out_in)

    def with_dropout(self, rate: float) -> GPT2Config:
        """This config with embedding, attention and residual dropout ``rate`` (training's runtime choice)."""
        return dataclasses.replace(self, embd_pdrop=rate, attn_pdrop=rate, resid_pdrop=rate)

    @classmethod
    def small(cls, **overrides) -> GPT2Config:
        """GPT-2 small (124M parameters), the sizes of the ``gpt2`` checkpoint."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> GPT2Config:
        """A two-layer model with a 128-token vocabulary, for tests (EOS is the last token, as in GPT-2)."""
        sizes = dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=127, eos_token_id=127)
        return cls(**{**sizes, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face GPT-2 ``config.json`` dictionary (the compute dtype is a runtime choice, not saved)."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": int(self.vocab_size),
            "n_positions": int(self.n_positions),
            "n_ctx": int(self.n_positions),
            "n_embd": int(self.n_embd),
            "n_layer": int(self.n_layer),
            "n_head": int(self.n_head),
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": float(self.layer_norm_epsilon),
            "bos_token_id": int(self.bos_token_id),
            "eos_token_id": int(self.eos_token_id),
            "embd_pdrop": float(self.embd_pdrop),
            "attn_pdrop": float(self.attn_pdrop),
            "resid_pdrop": float(self.resid_pdrop),
            "initializer_range": float(self.initializer_range),
            **_UNSUPPORTED_HF_FLAGS,
        }

    @classmethod
    def from_dict(cls, hf_config: Mapping[str, Any], *, source: str = "config", **overrides) -> GPT2Config:
        """Builds a config from a Hugging Face GPT-2 ``config.json`` dictionary.

        Raises ValueError naming ``source`` and the offending key when the dictionary describes a model this
        implementation would compute differently (another architecture, activation or attention variant).
        Unknown keys (tokenizer settings, task parameters) are ignored. ``overrides`` set fields such as dtype.
        """
        model_type = hf_config.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"{source}: model_type={model_type!r}, expected 'gpt2'")
        activation = hf_config.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise ValueError(f"{source}: activation_function={activation!r}, only 'gelu_new' is supported")
        n_inner = hf_config.get("n_inner")
        n_embd = hf_config.get("n_embd", cls.n_embd)
        if n_inner is not None and n_inner != 4 * n_embd:
            raise ValueError(f"{source}: n_inner={n_inner}, only None (= 4 * n_embd = {4 * n_embd}) is supported")
        for key, supported in _UNSUPPORTED_HF_FLAGS.items():
            if key in hf_config and bool(hf_config[key]) != supported:
                raise ValueError(f"{source}: {key}={hf_config[key]!r} is not supported (only {supported})")
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
        values = {name: hf_config[name] for name in fields if hf_config.get(name) is not None}
        try:
            return cls(**{**values, **overrides})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source}: {error}") from error


def _dense(features: int, config: GPT2Config, name: str, kernel_out_in: bool, std: float | None = None) -> nn.Module:
    """Hugging Face's ``Conv1D``, y = x @ kernel + bias: an ``nn.Dense`` with its kernel [in, out] as checkpoints
    store it (the plain path), or `matmul_cpu.OutInDense` for [out, in] kernels (`kernels_out_in`)."""
    layer = OutInDense if kernel_out_in else nn.Dense
    return layer(
        features, dtype=config.dtype, kernel_init=nn.initializers.normal(std or config.initializer_range), name=name
    )


def _layer_norm(config: GPT2Config, name: str | None = None) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] as PyTorch computes it, for parity with Hugging Face.
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=config.dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )


def _projection_std(config: GPT2Config) -> float:
    """GPT-2's scaled init of the residual projections: std / sqrt(2 * n_layer)."""
    return config.initializer_range / math.sqrt(2 * config.n_layer)


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention that writes its new keys/values into this layer's cache."""

    config: GPT2Config
    kernel_out_in: bool = False

    @nn.compact
    def __call__(self, x, bias, kv=None, index=None, deterministic=True):
        """x [B,T,D]; bias [B,1,T,S]; kv: None, or this layer's cache (k, v), each [B,H,S,Dh]: the T new keys and
        values are written at slots [index, index + T), in place. Returns (output [B,T,D], new (k, v) or None)."""
        cfg = self.config
        batch, length, _ = x.shape
        qkv = _dense(3 * cfg.n_embd, cfg, "c_attn", self.kernel_out_in)(x)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3, cfg.n_head, cfg.head_dim), 3, axis=2)
        q, k, v = (t[:, :, 0].transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, T, Dh]
        k, v, kv = write_cache(kv, k, v, index)
        # Scores accumulate and stay in float32: rounded to bfloat16 they moved label scores by tenths of a nat.
        scores = jnp.einsum("bhtd,bhsd->bhts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores / jnp.float32(math.sqrt(cfg.head_dim)) + bias
        weights = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        weights = nn.Dropout(cfg.attn_pdrop)(weights, deterministic=deterministic)
        out = jnp.einsum("bhts,bhsd->bthd", weights, v.astype(cfg.dtype)).reshape(batch, length, cfg.n_embd)
        out = _dense(cfg.n_embd, cfg, "c_proj", self.kernel_out_in, _projection_std(cfg))(out)
        return nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic), kv


class GPT2MLP(nn.Module):
    """The position-wise feed-forward layer: D -> 4D -> gelu_new -> D."""

    config: GPT2Config
    kernel_out_in: bool = False

    @nn.compact
    def __call__(self, x, deterministic=True):
        cfg = self.config
        hidden = nn.gelu(_dense(4 * cfg.n_embd, cfg, "c_fc", self.kernel_out_in)(x), approximate=True)
        out = _dense(cfg.n_embd, cfg, "c_proj", self.kernel_out_in, _projection_std(cfg))(hidden)
        return nn.Dropout(cfg.resid_pdrop)(out, deterministic=deterministic)


class GPT2Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: GPT2Config
    kernel_out_in: bool = False

    @nn.compact
    def __call__(self, x, bias, kv=None, index=None, position_ids=None, deterministic=True):
        attn_out, kv = GPT2Attention(self.config, self.kernel_out_in, name="attn")(
            _layer_norm(self.config, "ln_1")(x), bias, kv, index, deterministic
        )
        x = x + attn_out
        x = x + GPT2MLP(self.config, self.kernel_out_in, name="mlp")(_layer_norm(self.config, "ln_2")(x), deterministic)
        return x, kv


class GPT2(nn.Module):
    """GPT-2 language model with the output head tied to the token embedding.

    Call with token ids or with input embeddings (e.g. a visual prefix followed by embedded prompt tokens).
    Without a cache, attention is causal over the T inputs and masked by attention_mask [B, T] (1 = real token).
    With a cache of S slots, the T inputs are written at slots [index, index + T) and attend to every slot that
    is causally before them and has attention_mask[B, S] == 1; the returned cache has index + T.
    ``kernel_out_in``: the block kernels are stored [out, in] (params from `matmul_cpu.kernels_out_in`, XLA:CPU's
    fast path; `imgllm.language.model.model_and_params` sets it from the parameters).
    """

    config: GPT2Config
    kernel_out_in: bool = False

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=cfg.dtype, param_dtype=jnp.float32, embedding_init=init)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=cfg.dtype, param_dtype=jnp.float32, embedding_init=init)
        # A list attribute set in setup names its modules h_0 .. h_{L-1}, as Hugging Face's transformer.h.{i}.
        self.h = [GPT2Block(cfg, self.kernel_out_in) for _ in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg)
        self.drop = nn.Dropout(cfg.embd_pdrop)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, D] (wte lookup), e.g. to concatenate after a visual prefix."""
        return self.wte(input_ids)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """The tied output head: final hidden states [..., D] -> float32 logits [..., V].

        A dot_general over the last axis of both operands, which reads the [V, D] embedding as it is stored. Flax's
        ``Embed.attend`` (a dot with the embedding's transpose) became, on XLA:CPU at one row, a slower fused
        transposing loop.
        """
        dtype = self.config.dtype
        logits = jax.lax.dot_general(
            hidden.astype(dtype),
            self.wte.embedding.astype(dtype),
            (((hidden.ndim - 1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32,
        )
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
        return_hidden (generation computes the head only for the last position)."""
        check_call_inputs(input_ids, inputs_embeds, self.config.n_embd)
        embeds = self.embed_tokens(input_ids) if input_ids is not None else inputs_embeds.astype(self.config.dtype)
        batch, length, _ = embeds.shape
        layout = call_layout(self.config, batch, length, attention_mask, position_ids, cache)
        # The residual stream is float32 in any compute dtype (the blocks' outputs are added to it in float32).
        x = self.drop(embeds.astype(jnp.float32) + self.wpe(layout.position_ids), deterministic=deterministic)
        x, new_cache = run_layers(self.h, x, layout, cache, deterministic)
        hidden = self.ln_f(x)
        if return_hidden:
            return hidden, new_cache
        return self.logits_from_hidden(hidden), new_cache


def init_params(config: GPT2Config, rng: jax.Array) -> dict:
    """Randomly initialised parameters (GPT-2's init: normal(0.02), scaled residual projections)."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(GPT2(config).init)(rng, dummy)["params"]
