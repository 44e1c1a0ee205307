"""An offline tokenizer trained from a list of texts (no hub download): a small byte-level BPE.

Byte-level BPE (GPT-2's scheme) decodes back to exactly the input text, so generated captions can be compared
with their references verbatim; on a small caption vocabulary (the demo's) every word ends up a single token.
The result is a Hugging Face `PreTrainedTokenizerFast` with GPT-2's conventions: one special token
`<|endoftext|>` that is BOS, EOS and PAD, left padding for generation. `save_pretrained(dir)` writes it so that
`transformers.AutoTokenizer.from_pretrained(dir)` (and `imgllm.language.hf.load_tokenizer`) load it from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 512, min_frequency: int = 1
) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer of at most `vocab_size` tokens on `texts`.

    The vocabulary always holds the 256 byte symbols (any text can be encoded) plus `<|endoftext|>`, which gets id
    0 (so a GPT2Config's bos/eos_token_id is `tokenizer.eos_token_id`). Deterministic for the same texts.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("train_bpe_tokenizer needs at least one text")
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is below {minimum} (256 byte symbols + {END_OF_TEXT})")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: tokenizers.Tokenizer) -> transformers.PreTrainedTokenizerFast:
    """Wraps a `tokenizers.Tokenizer` as a transformers tokenizer with GPT-2's special-token conventions."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        padding_side="left",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def tokenizer_from_json(tokenizer_json: str) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer stored in a checkpoint as `tokenizers` JSON (Tokenizer.to_str()), wrapped like
    train_bpe_tokenizer's."""
    return wrap_tokenizer(tokenizers.Tokenizer.from_str(tokenizer_json))


def check_vocabulary(tokenizer, vocab_size: int, source: str) -> None:
    """Raises ValueError, naming `source`, when the tokenizer can produce ids the LM has no embedding for."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the LM's vocab_size is {vocab_size}")
