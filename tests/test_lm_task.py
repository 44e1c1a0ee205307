"""The LM Task in the generic trainer: a few steps reduce the loss; the result exports to Hugging Face format."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import CORPUS

from imgllm.configs import lm_tiny
from imgllm.language import hf
from imgllm.train import loop, metrics_log
from imgllm.train.export import export_hf
from imgllm.train.lm_task import LMTask

jax.config.update("jax_enable_x64", False)


def tiny_lm_config(corpus_path, **overrides):
    config = lm_tiny.get_config()
    config.corpus = str(corpus_path)
    config.seq_len = 32
    config.lm.update(n_positions=32, n_embd=32, n_layer=1, n_head=2, vocab_size=300)
    config.tokenizer.vocab_size = 300
    config.global_batch_size = 8
    config.num_epochs = 3.0
    config.optimizer.learning_rate = 1e-2
    config.log_every_steps = 1
    config.update(overrides)
    return config


def train_losses(workdir):
    with open(workdir / metrics_log.METRICS_FILE) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_a_few_steps_reduce_the_loss_and_export_loads_back(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(CORPUS * 8))
    config = tiny_lm_config(corpus)
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    losses = train_losses(tmp_path / "run")
    assert len(losses) >= 3 and np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.5, losses  # nats per token

    out = export_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    config_back, params_back = hf.load_gpt2(out)
    assert config_back.n_embd == 32 and config_back.eos_token_id == hf.load_tokenizer(out).eos_token_id == 0
    trained = jax.device_get(result.state.params)
    for got, want in zip(jax.tree.leaves(params_back), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_prompt_completion_corpus_trains_on_completions_only(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": s[:10], "completion": s[10:]}) + "\n" for s in CORPUS))
    task = LMTask(tiny_lm_config(pairs))
    arrays = task.train_arrays()
    assert arrays["input_ids"].shape == (len(CORPUS), 32)
    prompt_lengths = [len(task.tokenizer.encode(s[:10])) for s in CORPUS]
    for row, length in enumerate(prompt_lengths):
        assert arrays["loss_mask"][row, :length].sum() == 0 and arrays["loss_mask"][row, length] == 1


def test_missing_corpus_is_named(tmp_path):
    task = LMTask(tiny_lm_config(""))
    with pytest.raises(ValueError, match="config.corpus is not set"):
        task.train_arrays()
