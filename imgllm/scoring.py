"""Classification by the language model: the class whose prompt the (prefix-conditioned) LM finds most likely.

For an image with visual prefix P and classes c with prompt templates e ("a photo of a {label}." ...):

    score[b, c] = log mean_e exp( sum_t log p(prompt_{c,e}[t] | P_b, BOS, prompt_{c,e}[<t]) )

i.e. the log of the template-averaged likelihood (a prompt ensemble in probability space). All images x classes
x templates are scored in one jitted call (`score_class_prompts`): the prompts are tokenised once, before jit,
into a `PromptTable`; inside jit each image's prefix is paired with every prompt of the table.

A free-text description is classified the same way without an image (`classify_texts`): the table's sequences
are BOS + description + a connector + the class prompt + EOS, and only the class-prompt tokens are scored.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from imgllm.models.bridge import prefixed_token_log_probs
from imgllm.models.lm import GPT2Config

DEFAULT_TEMPLATES = ("a photo of a {label}.", "a picture of a {label}.", "an image of a {label}.")
DEFAULT_TEXT_CONNECTOR = " This is "


@flax.struct.dataclass
class PromptTable:
    """Tokenised class prompts. input_ids int32 [C, E, T]: BOS + tokens + EOS, right-padded with EOS.
    target_mask float32 [C, E, T-1]: 1 where the token input_ids[..., t+1] counts in the score."""

    input_ids: jax.Array
    target_mask: jax.Array

    @property
    def num_classes(self) -> int:
        return self.input_ids.shape[0]


def fill_templates(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """[[template.format(label=name) for template] for name] with a clear error for a template without {label}."""
    if not class_names:
        raise ValueError("no class names to build prompts for")
    if not templates:
        raise ValueError("at least one prompt template is needed")
    for template in templates:
        if "{label}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{label}}' field")
    return [[template.format(label=name.replace("_", " ")) for template in templates] for name in class_names]


def _table_from_pieces(pieces: list[list[tuple[list[int], list[int]]]], bos_id: int, eos_id: int) -> PromptTable:
    """Packs per-(class, template) (context ids, scored ids) into a right-padded PromptTable."""
    rows = [[[bos_id] + context + scored + [eos_id] for context, scored in row] for row in pieces]
    length = max(len(seq) for row in rows for seq in row)
    input_ids = np.full((len(rows), len(rows[0]), length), eos_id, np.int32)
    target_mask = np.zeros((len(rows), len(rows[0]), length - 1), np.float32)
    for c, row in enumerate(pieces):
        for e, (context, scored) in enumerate(row):
            seq = rows[c][e]
            input_ids[c, e, :len(seq)] = seq
            # Targets are seq[1:]; the scored part (plus EOS) starts after BOS + context.
            target_mask[c, e, len(context):len(context) + len(scored) + 1] = 1.0
    return PromptTable(input_ids=input_ids, target_mask=target_mask)


Encoder = Callable[[str], Sequence[int]]


def build_prompt_table(encode: Encoder, eos_id: int, class_names: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES) -> PromptTable:
    """Tokenises every class x template prompt once (host side): [BOS] prompt [EOS], every prompt token scored.

    encode: text -> token ids without special tokens (e.g. a `tokenizers.Tokenizer`'s encode(...).ids, or
    `lambda s: hf_tokenizer(s, add_special_tokens=False)["input_ids"]`); eos_id: GPT-2's <|endoftext|>, which is
    also BOS and pad (the visual-prefix convention of `imgllm.models.bridge`).
    """
    prompts = fill_templates(class_names, templates)
    pieces = [[([], list(encode(prompt))) for prompt in row] for row in prompts]
    return _table_from_pieces(pieces, eos_id, eos_id)


def build_text_prompt_table(encode: Encoder, eos_id: int, descriptions: Sequence[str], class_names: Sequence[str],
                            templates: Sequence[str] = ("{label}.",),
                            connector: str = DEFAULT_TEXT_CONNECTOR) -> PromptTable:
    """Rows n * C + c: [BOS] description_n + connector (context, not scored), then prompt_c + [EOS] (scored)."""
    if isinstance(descriptions, str):
        raise TypeError("descriptions must be a list of strings, got a single string")
    for i, description in enumerate(descriptions):
        if not description.strip():
            raise ValueError(f"description {i} to classify is empty")
    prompts = fill_templates(class_names, templates)
    pieces = []
    for description in descriptions:
        context = list(encode(description.rstrip() + connector.rstrip()))
        pieces += [[(context, list(encode(" " + prompt))) for prompt in row] for row in prompts]
    return _table_from_pieces(pieces, eos_id, eos_id)


def _score_one_image(lm_params, lm_config: GPT2Config, table: PromptTable, prefix: jax.Array | None) -> jax.Array:
    """[C] ensemble log-likelihoods of every prompt of `table` after one image's prefix [K, D] (or none)."""
    num_classes, num_templates, length = table.input_ids.shape
    flat_ids = table.input_ids.reshape(num_classes * num_templates, length)
    prefixes = None if prefix is None else jnp.broadcast_to(prefix, (flat_ids.shape[0],) + prefix.shape)
    log_probs = prefixed_token_log_probs(lm_params, lm_config, prefixes, flat_ids)
    per_prompt = (log_probs * table.target_mask.reshape(flat_ids.shape[0], -1)).sum(-1)
    per_prompt = per_prompt.reshape(num_classes, num_templates)
    return jax.nn.logsumexp(per_prompt, axis=-1) - math.log(num_templates)


@functools.partial(jax.jit, static_argnames=("lm_config", "images_per_chunk"))
def score_class_prompts(lm_params: Any, lm_config: GPT2Config, prompt_table: PromptTable,
                        prefix_embeds: jax.Array | None, *, images_per_chunk: int = 8) -> jax.Array:
    """Log-likelihood [B, C] of each class's prompts under the LM conditioned on each image's prefix [B, K, D].

    One compiled call for all classes and templates; images are processed `images_per_chunk` at a time
    (lax.map) so memory stays bounded at chunk x C x E sequences of logits. prefix_embeds=None scores the
    prompts as plain text (result [1, C]), e.g. to get the LM's class prior.
    """
    if prefix_embeds is None:
        return _score_one_image(lm_params, lm_config, prompt_table, None)[None]
    return jax.lax.map(lambda prefix: _score_one_image(lm_params, lm_config, prompt_table, prefix),
                       prefix_embeds, batch_size=images_per_chunk)


def classify_by_lm(lm_params: Any, lm_config: GPT2Config, prompt_table: PromptTable,
                   prefix_embeds: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(predicted class ids [B], class log-likelihoods [B, C]); traceable inside a larger jitted function."""
    scores = score_class_prompts(lm_params, lm_config, prompt_table, prefix_embeds)
    return jnp.argmax(scores, axis=-1), scores


def classify_texts(lm_params: Any, lm_config: GPT2Config, encode: Encoder, eos_id: int, descriptions: Sequence[str],
                   class_names: Sequence[str], templates: Sequence[str] = ("{label}.",),
                   connector: str = DEFAULT_TEXT_CONNECTOR) -> tuple[np.ndarray, np.ndarray]:
    """Classifies free-text descriptions by LM likelihood: argmax_c log p(connector + prompt_c + EOS | description).

    Returns (class ids [N], scores [N, C]), all descriptions x classes scored in one jitted call.
    """
    table = build_text_prompt_table(encode, eos_id, descriptions, class_names, templates, connector)
    scores = np.asarray(score_class_prompts(lm_params, lm_config, table, None))[0]
    scores = scores.reshape(len(descriptions), len(class_names))
    return scores.argmax(-1), scores
