"""Hugging Face GPT-2 weights and tokenizer, in and out.

`load_gpt2` reads a Hugging Face GPT-2 checkpoint (a directory with ``config.json`` and
``model.safetensors``, or a hub name that is fetched with ``huggingface_hub.snapshot_download``)
into an imgllm `GPT2Config` and a flax parameter tree; `save_gpt2` writes one back in the same
format, so that ``transformers.GPT2LMHeadModel.from_pretrained(out_dir)`` gives the same logits.

Why this works without any transposes: imgllm's GPT-2 names its parameters after Hugging Face's
(``wte``, ``wpe``, ``h_{i}/{ln_1, attn/c_attn, attn/c_proj, ln_2, mlp/c_fc, mlp/c_proj}``, ``ln_f``),
and HF GPT-2's ``Conv1D`` stores its weight as ``[in, out]``, exactly a flax ``Dense`` kernel.
So a flax path maps to an HF key by a fixed renaming (`hf_key_for_path`), and the list of keys
and shapes a checkpoint must hold comes from the model itself (`expected_hf_shapes`): every key
and shape is checked, and every difference is reported by name before any tensor is loaded.

Only safetensors are read: ``pytorch_model.bin`` is a pickle, and unpickling can run code. Nothing read from
the directory is trusted: config values are checked (`check_config_values`) and compared with the sizes the
safetensors headers hold (`check_config_against_checkpoint`) before the model's shapes are built from them, so a
config.json claiming 100,000 layers fails in milliseconds; shard names in the index cannot leave the model
directory (`shard_path`); a corrupt or truncated file is reported by name (`CorruptCheckpointError`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from safetensors import SafetensorError, safe_open

from imgllm.language.gpt2 import GPT2Config, init_params

# File names of a Hugging Face model directory.
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# What `snapshot_download` fetches from the hub: config, safetensors weights, tokenizer files.
HUB_ALLOW_PATTERNS = (
    CONFIG_FILE,
    "generation_config.json",
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX_FILE,
    "model-*-of-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)

# GPT2LMHeadModel prefixes its transformer weights with this; the original hub checkpoints do not.
TRANSFORMER_PREFIX = "transformer."
LM_HEAD_KEY = "lm_head.weight"
# Non-persistent buffers that older transformers versions saved with the weights: the causal
# mask ``h.{i}.attn.bias`` [1, 1, n_positions, n_positions] and the scalar ``h.{i}.attn.masked_bias``.
# imgllm builds its mask on the fly, so they carry no information and are skipped.
_ATTENTION_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_LAYER_SCOPE = re.compile(r"^h_(\d+)$")
_LAYER_KEY = re.compile(r"^h\.(\d+)\.")
# config.json sizes that must be positive integers (JSON true/false are not sizes, though Python calls them ints).
_CONFIG_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
# Where a checkpoint shows each size (`checkpoint_sizes`).
_SIZE_EVIDENCE = {
    "n_layer": "h.{i} blocks",
    "vocab_size": "rows of wte.weight",
    "n_embd": "columns of wte.weight",
    "n_positions": "rows of wpe.weight",
}
# flax leaf name -> HF parameter suffix (Dense kernel, LayerNorm scale and Embed table are all "weight").
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes differ from what the model expects; the message lists each one."""


class CorruptCheckpointError(ValueError):
    """A weight file is not readable safetensors (corrupt header, truncated data); the message names the file."""


# ----------------------------------------------------------------------------- key mapping


def hf_key_for_path(path: tuple[str, ...]) -> str:
    """Hugging Face key (without the ``transformer.`` prefix) of a flax parameter path.

    ``("h_3", "attn", "c_attn", "kernel")`` -> ``"h.3.attn.c_attn.weight"``;
    ``("wte", "embedding")`` -> ``"wte.weight"``; ``("ln_f", "scale")`` -> ``"ln_f.weight"``.
    """
    *scopes, leaf = path
    if leaf not in _LEAF_TO_HF:
        raise ValueError(f"parameter {'/'.join(path)!r}: leaf {leaf!r} has no Hugging Face name")
    parts = []
    for scope in scopes:
        layer = _LAYER_SCOPE.match(scope)
        parts.append(f"h.{layer.group(1)}" if layer else scope)
    return ".".join(parts + [_LEAF_TO_HF[leaf]])


def flatten_tree(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> {path tuple: leaf}."""
    flat = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, prefix + (name,)))
        else:
            flat[prefix + (name,)] = value
    return flat


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    """{path tuple: leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def abstract_params(config: GPT2Config) -> dict[str, Any]:
    """The parameter tree (`jax.ShapeDtypeStruct` leaves) that `GPT2(config)` creates, without computing it."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def expected_hf_shapes(config: GPT2Config) -> dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct]]:
    """{HF key (unprefixed): (flax path, ShapeDtypeStruct)} for every parameter of `GPT2(config)`."""
    return {hf_key_for_path(path): (path, leaf) for path, leaf in flatten_tree(abstract_params(config)).items()}


def describe_mismatches(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """One line per missing key, unexpected key and shape mismatch between two {name: shape} maps."""
    lines = [
        f"missing key {name!r} (expected shape {tuple(shape)})" for name, shape in expected.items() if name not in found
    ]
    lines += [
        f"unexpected key {name!r} (shape {tuple(shape)})" for name, shape in found.items() if name not in expected
    ]
    lines += [
        f"shape mismatch for {name!r}: found {tuple(found[name])}, expected {tuple(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
    ]
    return lines


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise `CheckpointMismatchError` naming every key of `found` that differs from `expected`."""
    lines = describe_mismatches(found, expected)
    if lines:
        raise CheckpointMismatchError(f"{what}: {len(lines)} problem(s):\n  " + "\n  ".join(lines))


# ----------------------------------------------------------------------------- locating a checkpoint


def _looks_like_local_path(name: str) -> bool:
    """True for names a user means as a path (absolute, ./, ../, ~, or an existing file) rather than a hub id."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") > 1


def resolve_model_dir(
    path_or_hub_name: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> str:
    """A local directory holding the checkpoint: the argument itself, or a hub snapshot of it.

    A hub name (``"openai-community/gpt2"``) is fetched with `huggingface_hub.snapshot_download`,
    restricted to `HUB_ALLOW_PATTERNS` (config, safetensors, tokenizer files: never the pickles).
    It uses the hub cache (``cache_dir``, default ``HF_HUB_CACHE``), so offline
    (``local_files_only=True`` or ``HF_HUB_OFFLINE=1``) a cached snapshot is found without a network.
    """
    name = os.fspath(path_or_hub_name)
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    if _looks_like_local_path(name):
        raise FileNotFoundError(f"{name!r} is not a directory (expected a Hugging Face model directory or hub name)")
    from huggingface_hub import snapshot_download  # imported here: only hub names need it

    try:
        return snapshot_download(
            repo_id=name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=list(HUB_ALLOW_PATTERNS),
        )
    except (OSError, ValueError) as error:  # hub errors: not found, offline and not cached, invalid repo id
        raise FileNotFoundError(
            f"{name!r} is not a local directory, and the Hugging Face hub could not provide "
            f"it ({type(error).__name__}: {error})"
        ) from error


def _allowed_shard_roots(model_dir: str) -> list[str]:
    """Real folders a shard may live in: the model directory and, for a hub cache snapshot, the repo's blobs.

    ``huggingface_hub`` stores ``snapshots/<commit>/model-00001-of-00002.safetensors`` as a link to
    ``../../blobs/<sha256>``, so a snapshot's shards legitimately resolve there.
    """
    real_dir = os.path.realpath(model_dir)
    roots = [real_dir]
    if os.path.basename(os.path.dirname(real_dir)) == "snapshots":
        roots.append(os.path.join(os.path.dirname(os.path.dirname(real_dir)), "blobs"))
    return roots


def shard_path(model_dir: str, shard: Any, index_file: str) -> str:
    """The path of a shard named in `index_file`, refused (ValueError naming both) when it leaves `model_dir`.

    An index is untrusted text: an absolute name, ``../``, or a link resolving outside the directory would make
    loading a model read any file the user can read (a key file, a device that never ends).
    """
    if not isinstance(shard, str) or not shard or os.path.isabs(shard):
        raise ValueError(f"{index_file} names shard {shard!r}: shards must be relative file names in {model_dir}")
    path = os.path.join(model_dir, shard)
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, root]) == root for root in _allowed_shard_roots(model_dir)):
        raise ValueError(f"{index_file} names shard {shard!r}, which resolves to {real}, outside {model_dir}")
    return path


def _shard_names(index_file: str) -> list[str]:
    """The distinct shard names of a ``model.safetensors.index.json``, sorted; ValueError naming a malformed file."""
    with open(index_file) as f:
        try:
            index = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{index_file} is not valid JSON: {error}") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f'{index_file} has no "weight_map" object (key -> shard file name)')
    return sorted(set(weight_map.values()), key=str)


def safetensors_files(model_dir: str) -> list[str]:
    """The safetensors weight files of `model_dir` (one file, or the shards its index names).

    Shard names that leave the directory are refused (`shard_path`). Raises FileNotFoundError with a conversion
    command when the directory only has ``pytorch_model.bin``.
    """
    single = os.path.join(model_dir, SAFETENSORS_FILE)
    index = os.path.join(model_dir, SAFETENSORS_INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        shards = [shard_path(model_dir, shard, index) for shard in _shard_names(index)]
        missing = [shard for shard in shards if not os.path.isfile(shard)]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are not there: {missing}")
        return shards
    pickles = [name for name in PICKLE_WEIGHT_FILES if os.path.isfile(os.path.join(model_dir, name))]
    if pickles:
        raise FileNotFoundError(
            f"{model_dir} has only {pickles[0]} (a pickle); imgllm reads safetensors only, because "
            "unpickling a file can run arbitrary code. If you trust the file, convert it once with:\n"
            '  python -c "from transformers import GPT2LMHeadModel; '
            f"GPT2LMHeadModel.from_pretrained('{model_dir}').save_pretrained('{model_dir}-safetensors')\"\n"
            "and load the new directory (it holds model.safetensors)."
        )
    raise FileNotFoundError(f"{model_dir} has no {SAFETENSORS_FILE} (nor {SAFETENSORS_INDEX_FILE})")


# ----------------------------------------------------------------------------- config


def hf_config_dict(config: GPT2Config, weights_dtype: str = "float32") -> dict[str, Any]:
    """Hugging Face ``config.json`` contents for `config`, with the weights stored as `weights_dtype`."""
    return {**config.to_dict(), "dtype": weights_dtype}


def _config_value(hf_config: Mapping[str, Any], key: str) -> Any:
    """A config.json value as `GPT2Config.from_dict` reads it: missing or null means the default."""
    value = hf_config.get(key)
    return getattr(GPT2Config, key) if value is None else value


def check_config_values(hf_config: Any, source: str) -> None:
    """Raise ValueError naming `source` and the key when a config.json value is not a usable GPT-2 size.

    Sizes must be positive integers (not booleans or floats), n_embd a multiple of n_head, and
    layer_norm_epsilon a finite positive number; `GPT2Config.from_dict` checks the architecture variant.
    """
    if not isinstance(hf_config, dict):
        raise ValueError(f"{source} must hold a JSON object, not {type(hf_config).__name__}")
    for key in _CONFIG_SIZES:
        value = _config_value(hf_config, key)
        if type(value) is not int or value <= 0:
            raise ValueError(f"{source}: {key}={value!r} must be a positive integer")
    n_embd, n_head = _config_value(hf_config, "n_embd"), _config_value(hf_config, "n_head")
    if n_embd % n_head:
        raise ValueError(f"{source}: n_embd={n_embd} is not divisible by n_head={n_head}")
    epsilon = _config_value(hf_config, "layer_norm_epsilon")
    if type(epsilon) not in (int, float) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"{source}: layer_norm_epsilon={epsilon!r} must be a finite positive number")


def read_config_dict(model_dir: str) -> dict[str, Any]:
    """``model_dir/config.json`` as a dict; FileNotFoundError or ValueError naming the file when it is missing, not
    JSON or not an object."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir} has no {CONFIG_FILE}")
    with open(path, encoding="utf-8") as f:
        try:
            hf_config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(hf_config).__name__}")
    return hf_config


def read_config(model_dir: str) -> GPT2Config:
    """Parse ``model_dir/config.json`` into a `GPT2Config`; ValueError naming the file and key of a bad value."""
    path = os.path.join(model_dir, CONFIG_FILE)
    hf_config = read_config_dict(model_dir)
    check_config_values(hf_config, path)
    # GPT2Config.from_dict rejects (naming the key) any variant imgllm's GPT-2 would compute differently.
    return GPT2Config.from_dict(hf_config, source=path)


def checkpoint_sizes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The config sizes a checkpoint's {unprefixed key: shape} implies: n_layer (how many ``h.{i}`` blocks),
    and vocab_size, n_positions, n_embd from the embedding tables when they are there and 2-D."""
    sizes = {"n_layer": len({match.group(1) for match in map(_LAYER_KEY.match, shapes) if match})}
    wte, wpe = shapes.get("wte.weight"), shapes.get("wpe.weight")
    if wte is not None and len(wte) == 2:
        sizes["vocab_size"], sizes["n_embd"] = wte
    if wpe is not None and len(wpe) == 2:
        sizes["n_positions"] = wpe[0]
    return sizes


def check_config_against_checkpoint(
    config: GPT2Config, shapes: Mapping[str, tuple[int, ...]], source: str, where: str
) -> None:
    """Raise `CheckpointMismatchError` naming each config.json size that the checkpoint's tensors contradict.

    Cheap (the shapes come from the safetensors headers), so it runs before the model's own parameter shapes
    are built, which costs time in proportion to n_layer: a config claiming more layers than the checkpoint
    holds fails here. Fewer layers pass, and the full key check then names each unexpected key.
    """
    found = checkpoint_sizes(shapes)
    lines = [
        f"{name}={getattr(config, name)}, but the checkpoint holds {value} {_SIZE_EVIDENCE[name]}"
        for name, value in found.items()
        if (config.n_layer > value if name == "n_layer" else getattr(config, name) != value)
    ]
    if lines:
        raise CheckpointMismatchError(f"{source} does not describe the weights in {where}:\n  " + "\n  ".join(lines))


# ----------------------------------------------------------------------------- load


def _strip_prefix(key: str) -> str:
    return key[len(TRANSFORMER_PREFIX) :] if key.startswith(TRANSFORMER_PREFIX) else key


def _open_safetensors(path: str):
    """`safe_open(path)`, with a corrupt or truncated file reported as `CorruptCheckpointError` naming it."""
    try:
        return safe_open(path, framework="flax")
    except SafetensorError as error:
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {error}") from error


def tensor_index(files: Iterable[str]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """{checkpoint key: (file, key in file, shape)} from the safetensors headers, without reading tensors."""
    index = {}
    for path in files:
        with _open_safetensors(path) as f:
            for key in f.keys():
                if key in index:
                    raise CheckpointMismatchError(f"key {key!r} appears in both {index[key][0]} and {path}")
                index[key] = (path, key, tuple(f.get_slice(key).get_shape()))
    return index


def read_tensors(locations: Mapping[str, tuple[str, str]]) -> dict[str, jax.Array]:
    """{name: tensor} for {name: (file, key in file)}, opening each file once."""
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (path, key) in locations.items():
        by_file.setdefault(path, []).append((name, key))
    tensors = {}
    for path, entries in by_file.items():
        with _open_safetensors(path) as f:
            for name, key in entries:
                try:
                    tensors[name] = f.get_tensor(key)
                except SafetensorError as error:
                    raise CorruptCheckpointError(f"{path}: tensor {key!r} cannot be read: {error}") from error
    return tensors


def _model_keys(
    index: Mapping[str, tuple[str, str, tuple[int, ...]]], source: str
) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Checkpoint index re-keyed by unprefixed HF name, without attention buffers and the tied head."""
    model_keys: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for key, entry in index.items():
        name = _strip_prefix(key)
        if key == LM_HEAD_KEY or _ATTENTION_BUFFER.match(name):
            continue
        if name in model_keys:
            raise CheckpointMismatchError(f"{source}: {name!r} appears twice (with and without {TRANSFORMER_PREFIX!r})")
        model_keys[name] = entry
    return model_keys


def _check_tied_head(index: Mapping[str, tuple[str, str, tuple[int, ...]]], wte: jax.Array, source: str) -> None:
    """An ``lm_head.weight`` in the checkpoint must be the tied ``wte.weight``: imgllm has no separate head."""
    if LM_HEAD_KEY not in index:
        return
    path, key, _ = index[LM_HEAD_KEY]
    head = read_tensors({LM_HEAD_KEY: (path, key)})[LM_HEAD_KEY]
    if head.shape != wte.shape or not bool(jnp.array_equal(head, wte)):
        raise CheckpointMismatchError(
            f"{source}: {LM_HEAD_KEY!r} differs from 'wte.weight'; imgllm's GPT-2 ties the output head to the "
            "token embedding and cannot load an untied head"
        )


def load_gpt2(
    path_or_hub_name: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> tuple[GPT2Config, dict[str, Any]]:
    """Load a Hugging Face GPT-2 checkpoint as (`GPT2Config`, flax params for `GPT2(config)`).

    `path_or_hub_name` is a directory with ``config.json`` and ``model.safetensors`` (or sharded
    ``model-*.safetensors`` with an index), or a hub name (see `resolve_model_dir`). Keys may carry
    the ``transformer.`` prefix or not; attention-mask buffers are skipped; ``lm_head.weight``, when
    present, must equal ``wte.weight``. Every key and shape is checked against the model before any
    tensor is read, and all differences are reported by name. Tensors are cast to the model's
    parameter dtype (float32), so float16/bfloat16 checkpoints load too. The config's sizes are checked against
    the checkpoint's headers first, so an absurd config.json fails at once, naming the key.
    """
    model_dir = resolve_model_dir(
        path_or_hub_name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    files = safetensors_files(model_dir)
    config = read_config(model_dir)
    index = tensor_index(files)
    model_keys = _model_keys(index, model_dir)
    found = {name: shape for name, (_, _, shape) in model_keys.items()}
    check_config_against_checkpoint(config, found, os.path.join(model_dir, CONFIG_FILE), model_dir)
    expected = expected_hf_shapes(config)
    check_shapes(
        found,
        {name: leaf.shape for name, (_, leaf) in expected.items()},
        f"{model_dir} does not match the GPT-2 its config.json describes",
    )
    tensors = read_tensors({name: (path, key) for name, (path, key, _) in model_keys.items()})
    _check_tied_head(index, tensors["wte.weight"], model_dir)
    params = unflatten_tree({path: tensors[name].astype(leaf.dtype) for name, (path, leaf) in expected.items()})
    return config, params


# ----------------------------------------------------------------------------- save


def save_gpt2(out_dir: str | os.PathLike, config: GPT2Config, params: Mapping[str, Any], *, tokenizer=None) -> str:
    """Write `params` of `GPT2(config)` as a Hugging Face GPT-2 directory; return its path.

    Writes ``config.json`` and ``model.safetensors`` (keys as ``GPT2LMHeadModel.save_pretrained``
    writes them: ``transformer.``-prefixed, head tied so not stored), and the tokenizer's files when
    one is given, so ``GPT2LMHeadModel.from_pretrained(out_dir)`` and `load_gpt2(out_dir)` both work.
    The parameter tree is checked against the model first; a wrong path or shape is named.
    """
    from safetensors.flax import save_file

    out_dir = os.fspath(out_dir)
    if set(params) == {"params"}:  # accept flax variables as well as the bare parameter tree
        params = params["params"]
    flat = flatten_tree(params)
    expected = expected_hf_shapes(config)
    check_shapes(
        {"/".join(path): np.shape(leaf) for path, leaf in flat.items()},
        {"/".join(path): leaf.shape for path, leaf in expected.values()},
        "params do not match GPT2(config)",
    )
    tensors = {TRANSFORMER_PREFIX + name: jnp.asarray(flat[path]) for name, (path, _) in expected.items()}
    dtypes = {str(t.dtype) for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"params mix dtypes {sorted(dtypes)}; cast them to one dtype before saving")
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, SAFETENSORS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(hf_config_dict(config, weights_dtype=dtypes.pop()), f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(
    path_or_hub_name: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
):
    """The checkpoint's tokenizer, set up for batched generation.

    The class is fixed, never read from the directory (whose tokenizer_config.json may name any class):
    `PreTrainedTokenizerFast` over tokenizer.json when there is one, else `GPT2TokenizerFast` over GPT-2's
    vocab.json + merges.txt. Padding goes on the left (decoder-only models continue from the last position), and
    a tokenizer without a pad token (GPT-2's) pads with its end-of-text token.
    """
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    model_dir = resolve_model_dir(
        path_or_hub_name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    if os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    elif all(os.path.isfile(os.path.join(model_dir, name)) for name in ("vocab.json", "merges.txt")):
        tokenizer = GPT2TokenizerFast.from_pretrained(model_dir)
    else:
        raise FileNotFoundError(f"{model_dir} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt")
    check_special_tokens_in_vocabulary(tokenizer, model_dir)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {model_dir} has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _vocabulary_file_tokens(model_dir: str) -> set[str]:
    """The tokens the directory's vocabulary file defines: tokenizer.json's model vocabulary and added tokens, or
    vocab.json's keys."""
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(path):
        return set(tokenizers.Tokenizer.from_file(path).get_vocab(with_added_tokens=True))
    with open(os.path.join(model_dir, "vocab.json"), encoding="utf-8") as f:
        return set(json.load(f))


def check_special_tokens_in_vocabulary(tokenizer, model_dir: str) -> None:
    """Raises ValueError when tokenizer_config.json or special_tokens_map.json names an end-of-text (or BOS) token
    that the vocabulary file does not define: transformers would add it with a new id that the model never emits,
    and captions would run on to the length limit."""
    defined = _vocabulary_file_tokens(model_dir)
    for role in ("eos", "bos"):
        token = getattr(tokenizer, f"{role}_token")
        if token is not None and str(token) not in defined:
            raise ValueError(
                f"{model_dir}: the {role} token {str(token)!r} (tokenizer_config.json or "
                f"special_tokens_map.json) is not in the vocabulary; it would get the new id "
                f"{getattr(tokenizer, f'{role}_token_id')}, which the model never emits"
            )


__all__ = [
    "check_special_tokens_in_vocabulary",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "abstract_params",
    "check_config_against_checkpoint",
    "check_config_values",
    "check_shapes",
    "checkpoint_sizes",
    "describe_mismatches",
    "expected_hf_shapes",
    "hf_config_dict",
    "hf_key_for_path",
    "load_gpt2",
    "load_tokenizer",
    "read_config",
    "read_config_dict",
    "read_tensors",
    "resolve_model_dir",
    "safetensors_files",
    "save_gpt2",
    "shard_path",
    "tensor_index",
]
