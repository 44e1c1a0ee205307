"""Shared test fixtures. Hugging Face: a tiny GPT-2 checkpoint directory made offline.

`tiny_hf_dir` holds what ``GPT2LMHeadModel.save_pretrained`` and a tokenizer's ``save_pretrained``
write (config.json, model.safetensors, tokenizer files) for a randomly initialised two-layer model
whose vocabulary is a byte-level BPE trained here. Every parameter, LayerNorms included, is drawn
at random so that a mixed-up mapping (ln_1 vs ln_2, kernel vs bias) changes the logits.

Fixtures are found by pytest; plain helpers are imported with ``from conftest import CORPUS``.

The whole session (both xdist workers and every train.py / infer.py subprocess, which inherit the environment) shares
one JAX persistent compilation cache, set here before anything imports JAX: the tiny configs compile the same
programs in many tests and processes, and each is then compiled once. A test that studies the cache sets its own.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "imgllm-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

CORPUS = [
    "the cat sat on the mat.",
    "a dog ran in the park, and the cat watched.",
    "an airplane flew over the ship on the sea.",
    "the red truck stopped next to a small frog.",
    "birds sing in the morning; deer drink at the river.",
]
# Sizes of the tiny model (vocab_size and eos come from the tokenizer).
TINY_SIZES = dict(n_positions=64, n_embd=32, n_layer=2, n_head=4)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 conventions: one <|endoftext|> token that is eos and pad)."""
    from imgllm.language.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS, vocab_size=320)


def randomize_torch_gpt2(model, seed: int = 0):
    """Redraw every parameter of a transformers GPT-2 (LayerNorm scales around 1), deterministically."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_ln_scale = name.endswith(".weight") and param.ndim == 1
            param.copy_(1.0 + 0.1 * noise if is_ln_scale else 0.1 * noise)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer):
    """Path of a tiny Hugging Face GPT-2 directory written by transformers itself."""
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=len(tiny_tokenizer),
        bos_token_id=tiny_tokenizer.eos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        **TINY_SIZES,
    )
    model = randomize_torch_gpt2(transformers.GPT2LMHeadModel(hf_config))
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def random_variables(init_fn, seed: int, scale: float = 0.3):
    """Variables with init_fn's structure (traced only: jax.eval_shape), filled with seeded normal noise * scale.

    BatchNorm variances are ones. Tests that compare two computations on the same weights need no real init,
    and numpy noise avoids compiling the initialisers' random-number code (seconds each on XLA:CPU).
    """
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return np.ones(leaf.shape, leaf.dtype)
        return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(init_fn))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny pipeline checkpoint (test_pipeline's, top_k 2, 5 new tokens), saved once per module: what the inference
    tests caption with."""
    from test_pipeline import tiny_pipeline_parts, tiny_tokenizer

    from imgllm.pipeline import checkpoint as pc

    params, config = tiny_pipeline_parts(top_k=2, max_new_tokens=5)
    return pc.save_pipeline_checkpoint(tmp_path_factory.mktemp("pipeline") / "ckpt", params, config, tiny_tokenizer())


@pytest.fixture(scope="module")
def infer():
    """infer.py's command as a module, `imgllm.commands.infer` (infer.py is a shim over it): its main() runs in this
    process (no second JAX start-up), and tests may patch the names it calls (caption_files)."""
    return importlib.import_module("imgllm.commands.infer")
