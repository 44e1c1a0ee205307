"""The key/value cache and the attention mask every decoder of `imgllm.language` shares (GPT-2 and Llama).

Decoding uses an explicit, functional cache (`KVCache`) passed in and returned, rather than flax's mutable
``cache`` collection, so the generation loop can carry it through ``lax.while_loop`` and XLA can update it in place.
The cache holds the heads attention reads keys and values from: all of GPT-2's, and only the key/value heads of a
grouped-query model (`config.num_cache_heads`), so a Llama with 3 key/value heads for 9 query heads caches a third.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# Large negative (finite) additive bias for masked attention slots: finite so that a query with every key masked
# (a left-padding position) gets a uniform softmax instead of NaN. Its output is never used.
MASK_BIAS = float(np.finfo(np.float32).min)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for ``S`` slots, and how many slots are filled.

    k, v: one [batch, heads, S, head_dim] array per layer; index: int32 scalar, the first free slot. A pytree, so
    it can be a ``lax.while_loop`` carry (updated in place by XLA) and passed through ``jit``.

    The layout is what the decoding step reads fastest. Heads come before slots, so both attention matmuls read
    a layer's array as it is (no transpose copy). One array per layer, not one stacked [n_layer, ...] array: XLA
    copies a layer's slice out of a stacked array before the matmul reads it.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.k[0].shape[2]

    def map_rows(self, fn) -> KVCache:
        """The cache with ``fn`` applied to every layer's keys and values (batch first), e.g. to gather rows."""
        return self.replace(k=tuple(fn(k) for k in self.k), v=tuple(fn(v) for v in self.v))


def init_cache(config: Any, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache of ``max_len`` slots for a model of ``config`` (zeros; slots are only read once written and
    unmasked). Any LM config: it reads n_layer, num_cache_heads, head_dim, n_positions and dtype."""
    if max_len > config.n_positions:
        raise ValueError(f"cache length {max_len} exceeds the model's n_positions={config.n_positions}")
    shape = (batch, config.num_cache_heads, max_len, config.head_dim)
    dtype = config.dtype if dtype is None else dtype
    layers = range(config.n_layer)
    return KVCache(
        k=tuple(jnp.zeros(shape, dtype) for _ in layers),
        v=tuple(jnp.zeros(shape, dtype) for _ in layers),
        index=jnp.zeros((), jnp.int32),
    )


def attention_bias(attention_mask: jax.Array, query_positions: jax.Array) -> jax.Array:
    """Additive attention bias [B, 1, T, S]: 0 where query t may attend to slot s, a large negative value elsewhere.

    Slot s is visible to a query written at slot q when s <= q (causal) and attention_mask[b, s] == 1.
    query_positions: [T] slot index of each query (its cache slot, not its position id).
    """
    slots = jnp.arange(attention_mask.shape[1])
    causal = slots[None, :] <= query_positions[:, None]  # [T, S]
    allowed = causal[None, :, :] & (attention_mask[:, None, :] != 0)  # [B, T, S]
    return jnp.where(allowed, 0.0, MASK_BIAS).astype(jnp.float32)[:, None, :, :]


def write_cache(kv: tuple[jax.Array, jax.Array] | None, k: jax.Array, v: jax.Array, index) -> tuple:
    """(keys, values) to attend to, and the layer's new cache: without a cache the T new ones [B, H, T, Dh] and None;
    with one, the cache's arrays with the new ones written at slots [index, index + T), in place."""
    if kv is None:
        return k, v, None
    k_all, v_all = kv
    start = (0, 0, index, 0)
    k = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), start)
    v = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), start)
    return k, v, (k, v)


@flax.struct.dataclass
class CallLayout:
    """Where a model call's T inputs go: mask of the S slots they may see, their position ids and attention bias."""

    start: jax.Array  # int32 scalar: the slot of the first input (the cache's index, else 0)
    position_ids: jax.Array  # [B, T] int32
    bias: jax.Array  # [B, 1, T, S] float32 additive attention bias


def call_layout(
    config: Any, batch: int, length: int, attention_mask, position_ids, cache: KVCache | None
) -> CallLayout:
    """Checks a decoder call's mask and position ids against the inputs and the cache, and lays them out.

    attention_mask: None (all visible) or [B, S] with S the cache length (or T without a cache); position_ids: None
    (the slots themselves) or [B, T]. Shape errors are raised at trace time, naming what was expected.
    """
    slots = cache.max_length if cache is not None else length
    if attention_mask is None:
        attention_mask = jnp.ones((batch, slots), jnp.int32)
    if attention_mask.shape != (batch, slots):
        what = f"the cache length {slots}" if cache is not None else f"the {length} inputs"
        raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(batch, slots)} (batch, {what})")
    if slots > config.n_positions:
        raise ValueError(f"sequence of {slots} slots exceeds the model's n_positions={config.n_positions}")
    start = cache.index if cache is not None else jnp.zeros((), jnp.int32)
    query_slots = start + jnp.arange(length, dtype=jnp.int32)
    if position_ids is None:
        position_ids = jnp.broadcast_to(query_slots, (batch, length))
    if position_ids.shape != (batch, length):
        raise ValueError(f"position_ids has shape {position_ids.shape}, expected {(batch, length)}")
    return CallLayout(start=start, position_ids=position_ids, bias=attention_bias(attention_mask, query_slots))


def check_call_inputs(input_ids, inputs_embeds, width: int) -> None:
    """Raises ValueError unless exactly one of input_ids [B, T] and inputs_embeds [B, T, width] is given."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
    if input_ids is not None and input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != width):
        raise ValueError(f"inputs_embeds must be [batch, length, {width}], got shape {inputs_embeds.shape}")


def run_layers(layers, x, layout: CallLayout, cache: KVCache | None, deterministic: bool):
    """x through every layer (each ``layer(x, bias, kv, index, deterministic) -> (x, kv)``); returns (x, new cache)."""
    new_k, new_v = [], []
    for i, layer in enumerate(layers):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, kv = layer(x, layout.bias, kv, layout.start, layout.position_ids, deterministic)
        if kv is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
    length = x.shape[1]
    return x, None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v), index=cache.index + length)
