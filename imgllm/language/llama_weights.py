"""Llama-family weights in and out: Hugging Face directories (safetensors) and GGUF files.

`load_llama` reads a Hugging Face ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` directory (or
hub name) with the same untrusted-directory rules as GPT-2 (`imgllm.language.hf`: safetensors only, shard names
kept inside the directory, corrupt files named); `load_llama_gguf` reads a GGUF file through
`imgllm.language.gguf_file` (dequantised, llama.cpp's Q/K row order undone); `save_llama` writes a directory that
transformers loads with the same logits.

Both sources arrive as Hugging Face tensors ({key: [out, in] array}) and become flax parameters in one function
(`params_from_hf_tensors`), which checks every key and shape against the model the config describes before
anything is converted; the config's sizes are first checked against the tensors' shapes
(`check_config_against_tensors`), so a config.json claiming 100,000 layers fails before the model is built.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from imgllm.language import gguf_file, hf
from imgllm.language.llama import LlamaConfig
from imgllm.language.model import abstract_params

LM_HEAD_KEY = "lm_head.weight"
EMBED_KEY = "model.embed_tokens.weight"
_LAYER_SCOPE = re.compile(r"^layers_(\d+)$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# flax leaf -> (Hugging Face suffix, whether the array is transposed between the two).
_LEAF_TO_HF = {
    "kernel": ("weight", True),
    "scale": ("weight", False),
    "embedding": ("weight", False),
    "bias": ("bias", False),
}
# Buffers some checkpoints carry that hold no parameters (rotary tables, recomputed from the config).
_IGNORED_KEY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def hf_key_for_path(path: tuple[str, ...]) -> tuple[str, bool]:
    """(Hugging Face key, transposed?) of a flax parameter path of `imgllm.language.llama.Llama`.

    ``("layers_3", "self_attn", "q_proj", "kernel")`` -> ``("model.layers.3.self_attn.q_proj.weight", True)``;
    ``("embed", "embedding")`` -> ``("model.embed_tokens.weight", False)``; ``("lm_head", "kernel")`` ->
    ``("lm_head.weight", True)``.
    """
    *scopes, leaf = path
    if leaf not in _LEAF_TO_HF:
        raise ValueError(f"parameter {'/'.join(path)!r}: leaf {leaf!r} has no Hugging Face name")
    suffix, transposed = _LEAF_TO_HF[leaf]
    if scopes == ["lm_head"]:
        return f"lm_head.{suffix}", transposed
    parts = ["model"]
    for scope in scopes:
        layer = _LAYER_SCOPE.match(scope)
        parts.append(f"layers.{layer.group(1)}" if layer else "embed_tokens" if scope == "embed" else scope)
    return ".".join(parts + [suffix]), transposed


def expected_hf_shapes(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """{HF key: (flax path, HF shape, transposed?)} for every parameter of the model of ``config``."""
    expected = {}
    for path, leaf in hf.flatten_tree(abstract_params(config)).items():
        key, transposed = hf_key_for_path(path)
        expected[key] = (path, tuple(reversed(leaf.shape)) if transposed else tuple(leaf.shape), transposed)
    return expected


def checkpoint_sizes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """The config sizes a checkpoint's {HF key: shape} implies: num_hidden_layers (how many ``model.layers.{i}``),
    and vocab_size, hidden_size from the embedding table when it is there and 2-D."""
    sizes = {"num_hidden_layers": len({match.group(1) for match in map(_LAYER_KEY.match, shapes) if match})}
    embed = shapes.get(EMBED_KEY)
    if embed is not None and len(embed) == 2:
        sizes["vocab_size"], sizes["hidden_size"] = embed
    return sizes


def check_config_against_tensors(
    config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]], source: str, where: str
) -> None:
    """Raise `hf.CheckpointMismatchError` naming each config size that the tensors' shapes contradict (cheap: run
    before the model's own shapes are built, which costs time in proportion to the layer count)."""
    lines = []
    for name, value in checkpoint_sizes(shapes).items():
        claimed = getattr(config, name)
        if claimed > value if name == "num_hidden_layers" else claimed != value:
            lines.append(f"{name}={claimed}, but the tensors show {value}")
    if lines:
        raise hf.CheckpointMismatchError(f"{source} does not describe the weights in {where}:\n  " + "\n  ".join(lines))


def check_tensor_shapes(
    config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]], source: str, config_source: str
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """Checks a checkpoint's {HF key: shape} against the model of ``config`` and returns `expected_hf_shapes`.

    The config's sizes first (`check_config_against_tensors`, naming ``config_source``), then every key and shape,
    all differences named (`hf.CheckpointMismatchError`). A tied model's checkpoint may also hold ``lm_head.weight``.
    Shapes only: run on safetensors headers before a tensor is read."""
    found = {key: tuple(shape) for key, shape in shapes.items() if not _IGNORED_KEY.match(key)}
    check_config_against_tensors(config, found, config_source, source)
    expected = expected_hf_shapes(config)
    if config.tie_word_embeddings:
        found.pop(LM_HEAD_KEY, None)
    hf.check_shapes(
        found,
        {key: shape for key, (_, shape, _) in expected.items()},
        f"{source} does not match the {config.architecture} model its config describes",
    )
    return expected


def params_from_hf_tensors(config: LlamaConfig, tensors: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Flax parameters (float32) of the model of ``config`` from Hugging Face tensors {key: array}.

    Every key and shape is checked first (`check_tensor_shapes`). A tied model's checkpoint may also hold
    ``lm_head.weight``, which must then equal the embedding; every value must be finite.
    """
    shapes = {key: np.shape(value) for key, value in tensors.items()}
    expected = check_tensor_shapes(config, shapes, source, f"the config of {source}")
    return _params_from_checked_tensors(config, tensors, expected, source)


def _params_from_checked_tensors(
    config: LlamaConfig, tensors: Mapping[str, Any], expected: Mapping[str, Any], source: str
) -> dict[str, Any]:
    """`params_from_hf_tensors` after `check_tensor_shapes` returned ``expected``: the values' checks and layout."""
    if (
        config.tie_word_embeddings
        and LM_HEAD_KEY in tensors
        and not np.array_equal(np.asarray(tensors[LM_HEAD_KEY]), np.asarray(tensors[EMBED_KEY]))
    ):
        raise hf.CheckpointMismatchError(
            f"{source}: {LM_HEAD_KEY!r} differs from {EMBED_KEY!r}, but the config says tie_word_embeddings=true"
        )
    flat = {}
    for key, (path, _, transposed) in expected.items():
        value = np.asarray(tensors[key], dtype=np.float32)
        if not np.isfinite(value).all():
            raise ValueError(f"{source}: tensor {key!r} holds {int((~np.isfinite(value)).sum())} non-finite values")
        flat[path] = jnp.asarray(value.T if transposed else value)
    return hf.unflatten_tree(flat)


def hf_tensors_from_params(config: LlamaConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{Hugging Face key: array} of the parameters of the model of ``config`` (checked path by path)."""
    if set(params) == {"params"}:  # accept flax variables as well as the bare parameter tree
        params = params["params"]
    flat = hf.flatten_tree(params)
    expected = expected_hf_shapes(config)
    hf.check_shapes(
        {"/".join(path): np.shape(leaf) for path, leaf in flat.items()},
        {
            "/".join(path): (tuple(reversed(shape)) if transposed else shape)
            for path, shape, transposed in expected.values()
        },
        f"params do not match the {config.architecture} model of the config",
    )
    return {
        key: np.ascontiguousarray(np.asarray(flat[path]).T if transposed else np.asarray(flat[path]))
        for key, (path, _, transposed) in expected.items()
    }


# ----------------------------------------------------------------------------------------------- load / save


def read_llama_config(model_dir: str, **overrides) -> LlamaConfig:
    """``model_dir/config.json`` as a `LlamaConfig`; ValueError naming the file and key of a bad value."""
    path = os.path.join(model_dir, hf.CONFIG_FILE)
    return LlamaConfig.from_dict(hf.read_config_dict(model_dir), source=path, **overrides)


def load_llama(
    path_or_hub_name: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """A Hugging Face Llama-family checkpoint (directory or hub name) as (`LlamaConfig`, flax params).

    Safetensors only (`hf.safetensors_files` explains how to convert a pickle you trust); the config's sizes are
    checked against the safetensors headers before the model's shapes are built, and every key and shape before a
    tensor is read. float16/bfloat16 weights are cast to float32.
    """
    model_dir = hf.resolve_model_dir(
        path_or_hub_name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    files = hf.safetensors_files(model_dir)
    config = read_llama_config(model_dir)
    index = hf.tensor_index(files)
    shapes = {key: shape for key, (_, _, shape) in index.items()}
    expected = check_tensor_shapes(config, shapes, model_dir, os.path.join(model_dir, hf.CONFIG_FILE))
    wanted = [key for key in shapes if key in expected or key == LM_HEAD_KEY]
    tensors = hf.read_tensors({key: index[key][:2] for key in wanted})
    return config, _params_from_checked_tensors(config, tensors, expected, model_dir)


def load_llama_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, Any], Any]:
    """A GGUF file (llama, mistral or qwen2) as (`LlamaConfig`, flax params, its tokenizer): the header is checked
    before anything is allocated, every tensor dequantised to float32 (`imgllm.language.gguf_file`)."""
    path = os.fspath(path)
    model = gguf_file.read_gguf(path)
    config = LlamaConfig.from_dict(model.hf_config, source=path)
    return config, params_from_hf_tensors(config, model.tensors, path), model.tokenizer


def save_llama(out_dir: str | os.PathLike, config: LlamaConfig, params: Mapping[str, Any], *, tokenizer=None) -> str:
    """Writes the parameters of the model of ``config`` as a Hugging Face directory (``config.json``,
    ``model.safetensors`` and the tokenizer's files when given) that ``transformers.AutoModelForCausalLM`` loads
    with the same logits; returns its path. A tied head is not stored (as ``save_pretrained`` does)."""
    out_dir = os.fspath(out_dir)
    tensors = hf_tensors_from_params(config, params)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, hf.SAFETENSORS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, hf.CONFIG_FILE), "w") as f:
        json.dump({**config.to_dict(), "dtype": "float32"}, f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
