"""Next-token language modelling as a Task for the generic trainer: GPT-2 or a Llama-family model on a text corpus.

    corpus files ─ imgllm.data.text (tokenised once: packed documents or padded prompt/completion pairs)
      └─ input_ids, attention_mask, loss_mask [N, seq_len] ─ GPT-2 ─ cross-entropy on the loss_mask tokens

The model is a random-init GPT-2 of the sizes in config.lm, or a pretrained model to fine-tune (config.lm.pretrained:
a Hugging Face GPT-2 or Llama-family directory or hub name, or a GGUF file such as SmolLM2's). The tokenizer is
config.tokenizer.path, else the pretrained checkpoint's, else a byte-level BPE trained on the corpus (stored in the
checkpoint metadata, so evaluation and export need no corpus). `export_hf(workdir, out_dir)` writes a trained
checkpoint as a Hugging Face directory (weights, config and tokenizer) that transformers loads
(`imgllm.train.export.export_hf`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imgllm.data import text as text_lib
from imgllm.language.gpt2 import GPT2Config
from imgllm.language.load import load_lm_tokenizer, load_lm_weights, read_lm_config
from imgllm.language.model import LMConfig, initial_params
from imgllm.language.scoring import prefixed_token_stats
from imgllm.language.tokenizer import check_vocabulary, tokenizer_from_json, train_bpe_tokenizer
from imgllm.precision import compute_dtype, run_dtype
from imgllm.train.task_protocol import Metrics, Task, metric


def corpus_paths(spec: str | Sequence[str] | None, field: str) -> list[str]:
    """Corpus files from a config value: one path, comma-separated paths, or a list."""
    if not spec:
        raise ValueError(f"config.{field} is not set: give a text or JSON-lines corpus file (comma-separate several)")
    paths = spec.split(",") if isinstance(spec, str) else list(spec)
    return [path.strip() for path in paths if path.strip()]


def lm_config_from(config: ml_collections.ConfigDict, eos_token_id: int) -> LMConfig:
    """The LM's config: config.lm.pretrained's (a GPT-2 or Llama-family directory, hub name or GGUF file), or a
    random-init GPT-2 of the sizes in config.lm; dropout always from config.lm, the compute dtype from config.dtype
    (`imgllm.precision.run_dtype`). A random-init LM uses `eos_token_id` (the tokenizer's) as BOS and EOS."""
    lm = config.lm
    if lm.get("pretrained"):
        base = read_lm_config(lm.pretrained)
    else:
        base = GPT2Config(
            vocab_size=lm.vocab_size,
            n_positions=lm.n_positions,
            n_embd=lm.n_embd,
            n_layer=lm.n_layer,
            n_head=lm.n_head,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
        )
    return dataclasses.replace(base.with_dropout(lm.dropout), dtype=compute_dtype(run_dtype(config)))


def tokenizer_from_metadata(metadata: Mapping[str, Any]):
    """The tokenizer a checkpoint's task metadata names: its stored BPE (tokenizer_json) or tokenizer_path."""
    if metadata.get("tokenizer_json"):
        return tokenizer_from_json(metadata["tokenizer_json"])
    return load_lm_tokenizer(metadata["tokenizer_path"])


def _record_texts(records: Sequence[text_lib.TextRecord]) -> list[str]:
    """Every string of a corpus (to train a tokenizer on)."""
    return [t for r in records for t in (r.text, r.prompt, r.completion) if t is not None]


class LMTask(Task):
    """Trains the LM with next-token cross-entropy on config.corpus.

    Config fields: corpus, eval_corpus, seq_len, mask_prompt, truncate, dtype, lm.{pretrained, dropout,
    vocab_size, n_positions, n_embd, n_layer, n_head}, tokenizer.{path, vocab_size}.
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.tokenizer = None
        self.tokenizer_json = None  # set when the tokenizer was trained here (it lives in the checkpoint)
        tokenizer_source = config.tokenizer.get("path") or config.lm.get("pretrained")
        if tokenizer_source:
            self.tokenizer = load_lm_tokenizer(tokenizer_source)
        # A BPE trained on the corpus has <|endoftext|> at id 0 (imgllm.language.tokenizer), known before it exists.
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else 0
        self.lm_config = lm_config_from(config, eos)
        if config.seq_len > self.lm_config.n_positions:
            raise ValueError(
                f"config.seq_len={config.seq_len} exceeds the LM's n_positions={self.lm_config.n_positions}"
            )

    # ---- data (host side) ----
    def _ensure_tokenizer(self, records: Sequence[text_lib.TextRecord]) -> None:
        if self.tokenizer is None:
            vocab_size = min(self.config.tokenizer.vocab_size, self.lm_config.vocab_size)
            self.tokenizer = train_bpe_tokenizer(_record_texts(records), vocab_size=vocab_size)
            self.tokenizer_json = self.tokenizer.backend_tokenizer.to_str()
        check_vocabulary(self.tokenizer, self.lm_config.vocab_size, "config.tokenizer")

    def _examples(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
        records = [record for path in paths for record in text_lib.read_text_records(path)]
        self._ensure_tokenizer(records)
        examples = text_lib.tokenize_records(
            records,
            self.tokenizer,
            seq_len=self.config.seq_len,
            mask_prompt=self.config.mask_prompt,
            truncate=self.config.truncate,
        )
        return examples.arrays()

    def train_arrays(self) -> dict[str, np.ndarray]:
        return self._examples(corpus_paths(self.config.corpus, "corpus"))

    def eval_arrays(
        self, split: str | None = None, source: str | None = None, metadata: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray] | None:
        """Examples of `source` (a corpus path, e.g. from `train.py --mode=eval --data=...`) or config.eval_corpus.

        `split` is accepted for the loop's interface; a text corpus has no splits.
        """
        if metadata and metadata.get("tokenizer_json") and self.tokenizer is None:
            self.tokenizer = tokenizer_from_json(metadata["tokenizer_json"])
        spec = source or self.config.get("eval_corpus")
        return self._examples(corpus_paths(spec, "eval_corpus")) if spec else None

    # ---- variables ----
    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        return {"params": initial_params(self.lm_config, rng, pretrained=bool(self.config.lm.get("pretrained")))}

    def prepare_variables(self, variables: dict[str, Any], train_arrays) -> dict[str, Any]:
        """Puts config.lm.pretrained's weights in place of the random init, if a checkpoint is configured."""
        if not self.config.lm.get("pretrained"):
            return variables
        _, params = load_lm_weights(self.config.lm.pretrained)  # checked key by key against the same config
        return {**variables, "params": params}

    # ---- pure, traced ----
    def _token_metrics(
        self, params, batch, weights, *, deterministic: bool = True, dropout_rng: jax.Array | None = None
    ) -> tuple[jax.Array, Metrics]:
        """(mean loss over target tokens, metric sums); weights [B, T-1] select the target tokens."""
        log_probs, is_argmax = prefixed_token_stats(
            params, self.lm_config, None, batch["input_ids"], deterministic=deterministic, dropout_rng=dropout_rng
        )
        tokens = weights.sum()
        total = -(log_probs * weights).sum()
        return total / jnp.maximum(tokens, 1.0), {
            "loss": metric(total, tokens),
            "token_accuracy": metric((is_argmax * weights).sum(), tokens),
        }

    def loss(self, params, model_state, batch, rng, epoch) -> tuple[jax.Array, tuple[Metrics, dict]]:
        _, weights = text_lib.next_token_targets(batch["input_ids"], batch["loss_mask"].astype(jnp.float32))
        loss, metrics = self._token_metrics(
            params, batch, weights, deterministic=self.config.lm.dropout == 0, dropout_rng=rng
        )
        return loss, (metrics, model_state)

    def eval_metrics(self, variables, batch, *, tta: bool) -> Metrics:
        _, weights = text_lib.next_token_targets(batch["input_ids"], batch["loss_mask"].astype(jnp.float32))
        return self._token_metrics(variables["params"], batch, weights * batch["mask"][:, None])[1]

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {
            "tokenizer_json": self.tokenizer_json,
            "tokenizer_path": self.config.tokenizer.get("path") or self.config.lm.get("pretrained"),
            "lm_config": self.lm_config.to_dict(),
        }
