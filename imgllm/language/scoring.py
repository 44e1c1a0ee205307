"""Classification by the language model: the class whose prompt the (prefix-conditioned) LM finds most likely.

For an image with visual prefix P and classes c with prompt templates e ("a photo of a {label}." ...):

    score[b, c] = log mean_e exp( sum_t log p(prompt_{c,e}[t] | P_b, BOS, prompt_{c,e}[<t]) )

i.e. the log of the template-averaged likelihood (a prompt ensemble in probability space). All images x classes
x templates are scored in one jitted call (`score_class_prompts`): the prompts are tokenised once, before jit,
into a `ClassPromptTable`; inside jit each image's prefix is paired with every prompt of the table.

A free-text description is classified the same way without an image (`classify_texts`): the table's sequences
are BOS + description + a connector + the class prompt + EOS, and only the class-prompt tokens are scored.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imgllm.language import model as lm


def prefixed_token_log_probs(
    lm_params: Any,
    lm_config: lm.LMConfig,
    prefix_embeds: jax.Array | None,
    input_ids: jax.Array,
    *,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """log p(input_ids[:, t] | prefix, input_ids[:, :t]) for t = 1..T-1, as float32 [B, T-1] (see
    `prefixed_token_stats`)."""
    return prefixed_token_stats(
        lm_params, lm_config, prefix_embeds, input_ids, deterministic=deterministic, dropout_rng=dropout_rng
    )[0]


def prefixed_token_stats(
    lm_params: Any,
    lm_config: lm.LMConfig,
    prefix_embeds: jax.Array | None,
    input_ids: jax.Array,
    *,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(log p(input_ids[:, t] | prefix, input_ids[:, :t]), whether that token is the argmax), each [B, T-1].

    The argmax flags give greedy-decoding agreement under teacher forcing: greedy decoding after [prefix][BOS]
    reproduces a reference exactly iff every one of its tokens (and its EOS) is the argmax.

    input_ids [B, T] start with BOS and are right-padded (pads only follow real tokens, so causal attention never
    lets a real token see them; callers mask the pad positions' values). prefix_embeds [B, K, D] or None (K = 0:
    plain text). The LM head is applied only to the text positions, never to the prefix.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, length >= 2] (BOS + tokens), got shape {input_ids.shape}")
    embeds = lm.embed_tokens(lm_params, lm_config, input_ids)
    prefix_length = 0
    if prefix_embeds is not None:
        if prefix_embeds.ndim != 3 or prefix_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"prefix_embeds must be [{input_ids.shape[0]}, K, D], got shape {prefix_embeds.shape}")
        prefix_length = prefix_embeds.shape[1]
        embeds = jnp.concatenate([prefix_embeds.astype(embeds.dtype), embeds], axis=1)
    hidden, _ = lm.hidden_states(lm_params, lm_config, embeds, deterministic=deterministic, dropout_rng=dropout_rng)
    predicting = hidden[:, prefix_length:-1]  # text positions 0..T-2 predict tokens 1..T-1
    logits = lm.logits_from_hidden(lm_params, lm_config, predicting)
    targets = input_ids[:, 1:]
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    is_argmax = jnp.argmax(logits, axis=-1) == targets
    return target_logits - jax.nn.logsumexp(logits, axis=-1), is_argmax


DEFAULT_TEMPLATES = ("a photo of a {label}.", "a picture of a {label}.", "an image of a {label}.")
DEFAULT_TEXT_CONNECTOR = " This is "


@dataclasses.dataclass(frozen=True, eq=False)
class ClassPromptTable:
    """Tokenised class prompts. input_ids int32 [C, E, T]: BOS + tokens + EOS, right-padded with EOS.
    target_mask float32 [C, E, T-1]: 1 where the token input_ids[..., t+1] counts in the score.

    One type for both uses: a pytree of its two arrays (an argument of jitted functions such as
    `score_class_prompts`), and, holding read-only numpy arrays as the builders make it, hashable and compared by
    content, so it can also be a field of a static jit argument (`imgllm.pipeline.PipelineSpec.lm_class_prompts`).
    """

    input_ids: Any
    target_mask: Any

    @property
    def num_classes(self) -> int:
        return self.input_ids.shape[0]

    def __hash__(self) -> int:
        ids, mask = np.asarray(self.input_ids), np.asarray(self.target_mask)
        return hash((ids.shape, ids.tobytes(), mask.shape, mask.tobytes()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClassPromptTable):
            return NotImplemented
        return all(
            np.array_equal(np.asarray(a), np.asarray(b)) and np.asarray(a).dtype == np.asarray(b).dtype
            for a, b in ((self.input_ids, other.input_ids), (self.target_mask, other.target_mask))
        )


jax.tree_util.register_dataclass(ClassPromptTable, data_fields=["input_ids", "target_mask"], meta_fields=[])


def spoken_label(name: str) -> str:
    """How a class name reads in any prompt: underscores as spaces ("pickup_truck" → "pickup truck"), the one rule
    for class prompts, caption prompts and the gallery alike."""
    return str(name).replace("_", " ")


def fill_templates(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """[[template.format(label=name) for template] for name] with a clear error for a template without {label}."""
    if not class_names:
        raise ValueError("no class names to build prompts for")
    if not templates:
        raise ValueError("at least one prompt template is needed")
    blank = [name for name in class_names if not str(name).strip()]
    if blank:
        raise ValueError(f"labels must be non-empty strings, got {blank[0]!r}")
    repeated = sorted({name for name in class_names if list(class_names).count(name) > 1})
    if repeated:
        raise ValueError(f"labels must be unique, {repeated[0]!r} is repeated")
    spoken: dict[str, str] = {}
    for name in class_names:  # the prompt says "pickup truck" for "pickup_truck": two such labels would tie
        other = spoken.setdefault(spoken_label(name), name)
        if other != name:
            raise ValueError(f"labels {other!r} and {name!r} give the same prompts (an underscore reads as a space)")
    for template in templates:
        if "{label}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{label}}' field")
        try:
            template.format(label="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"prompt template {template!r}: {{label}} is its only field (write {{{{ and }}}} for "
                f"literal braces); {type(error).__name__}: {error}"
            ) from None
    return [[template.format(label=spoken_label(name)) for template in templates] for name in class_names]


def _table_from_pieces(
    pieces: list[list[tuple[list[int], list[int]]]], bos_id: int, eos_id: int, score_end: bool | Sequence[bool] = True
) -> ClassPromptTable:
    """Packs per-(class, template) (context ids, scored ids) into a right-padded ClassPromptTable; score_end: the EOS
    after the scored ids counts in the score too (the prompt is a whole text, not the beginning of one), for every
    template or per template (one flag per column)."""
    ends = [bool(score_end)] * len(pieces[0]) if isinstance(score_end, (bool, np.bool_)) else list(score_end)
    rows = [[[bos_id] + context + scored + [eos_id] for context, scored in row] for row in pieces]
    length = max(len(seq) for row in rows for seq in row)
    input_ids = np.full((len(rows), len(rows[0]), length), eos_id, np.int32)
    target_mask = np.zeros((len(rows), len(rows[0]), length - 1), np.float32)
    for c, row in enumerate(pieces):
        for e, (context, scored) in enumerate(row):
            seq = rows[c][e]
            input_ids[c, e, : len(seq)] = seq
            # Targets are seq[1:]; the scored part (plus EOS) starts after BOS + context.
            target_mask[c, e, len(context) : len(context) + len(scored) + int(ends[e])] = 1.0
    input_ids.setflags(write=False)
    target_mask.setflags(write=False)
    return ClassPromptTable(input_ids=input_ids, target_mask=target_mask)


Encoder = Callable[[str], Sequence[int]]


def template_is_whole_text(template: str) -> bool:
    """Whether a template reads as a whole caption ("a photo of a {label}.": text follows the label) rather than the
    beginning of one ("a small {label}": a caption would go on, e.g. "a small red circle at the top")."""
    return not template.rstrip().endswith("{label}")


def build_prompt_table(
    encode: Encoder,
    eos_id: int,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    score_end: bool | None = True,
) -> ClassPromptTable:
    """Tokenises every label x template prompt once (host side): [BOS] prompt [EOS], every prompt token scored.

    Labels may be any strings, several tokens long; the templates' own tokens are scored too, so several templates
    per label combine as a mixture: a label's score is the log of the mean over templates of each whole prompt's
    likelihood (`_score_one_image`), e.g. "a small {label}" and "a large {label}" together score a colour whatever
    the size. score_end: also score the EOS after the prompt (True: each prompt is a whole text, as the class
    templates a captioner is trained on), or not (False: a prompt is the beginning of a caption, and scoring its
    end would penalise every label alike for the words that should follow); None: decide per template with
    `template_is_whole_text` (in a mixture, "a photo of a {label}." scores its EOS and "a small {label}" does not).
    Without the EOS a label that begins another
    ("cat" / "cat food") scores at least as high as the longer one: end such templates with text after {label}.

    encode: text -> token ids without special tokens (e.g. a `tokenizers.Tokenizer`'s encode(...).ids, or
    `lambda s: hf_tokenizer(s, add_special_tokens=False)["input_ids"]`); eos_id: GPT-2's <|endoftext|>, which is
    also BOS and pad (the visual-prefix convention of `imgllm.bridge`).
    """
    prompts = fill_templates(class_names, templates)
    if score_end is None:
        score_end = [template_is_whole_text(template) for template in templates]
    pieces = [[([], list(encode(prompt))) for prompt in row] for row in prompts]
    return _table_from_pieces(pieces, eos_id, eos_id, score_end=score_end)


def build_text_prompt_table(
    encode: Encoder,
    eos_id: int,
    descriptions: Sequence[str],
    class_names: Sequence[str],
    templates: Sequence[str] = ("{label}.",),
    connector: str = DEFAULT_TEXT_CONNECTOR,
) -> ClassPromptTable:
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


def _score_one_image(lm_params, lm_config: lm.LMConfig, table: ClassPromptTable, prefix: jax.Array | None) -> jax.Array:
    """[C] ensemble log-likelihoods of every prompt of `table` after one image's prefix [K, D] (or none)."""
    num_classes, num_templates, length = table.input_ids.shape
    flat_ids = table.input_ids.reshape(num_classes * num_templates, length)
    prefixes = None if prefix is None else jnp.broadcast_to(prefix, (flat_ids.shape[0],) + prefix.shape)
    log_probs = prefixed_token_log_probs(lm_params, lm_config, prefixes, flat_ids)
    per_prompt = (log_probs * table.target_mask.reshape(flat_ids.shape[0], -1)).sum(-1)
    per_prompt = per_prompt.reshape(num_classes, num_templates)
    return jax.nn.logsumexp(per_prompt, axis=-1) - math.log(num_templates)


@functools.partial(jax.jit, static_argnames=("lm_config", "images_per_chunk"))
def score_class_prompts(
    lm_params: Any,
    lm_config: lm.LMConfig,
    prompt_table: ClassPromptTable,
    prefix_embeds: jax.Array | None,
    *,
    images_per_chunk: int = 8,
) -> jax.Array:
    """Log-likelihood [B, C] of each class's prompts under the LM conditioned on each image's prefix [B, K, D].

    One compiled call for all classes and templates; images are processed `images_per_chunk` at a time
    (lax.map) so memory stays bounded at chunk x C x E sequences of logits. prefix_embeds=None scores the
    prompts as plain text (result [1, C]), e.g. to get the LM's class prior.
    """
    if prefix_embeds is None:
        return _score_one_image(lm_params, lm_config, prompt_table, None)[None]
    return jax.lax.map(
        lambda prefix: _score_one_image(lm_params, lm_config, prompt_table, prefix),
        prefix_embeds,
        batch_size=images_per_chunk,
    )


def classify_by_lm(
    lm_params: Any, lm_config: lm.LMConfig, prompt_table: ClassPromptTable, prefix_embeds: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(predicted class ids [B], class log-likelihoods [B, C]); traceable inside a larger jitted function."""
    scores = score_class_prompts(lm_params, lm_config, prompt_table, prefix_embeds)
    return jnp.argmax(scores, axis=-1), scores


def classify_texts(
    lm_params: Any,
    lm_config: lm.LMConfig,
    encode: Encoder,
    eos_id: int,
    descriptions: Sequence[str],
    class_names: Sequence[str],
    templates: Sequence[str] = ("{label}.",),
    connector: str = DEFAULT_TEXT_CONNECTOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Classifies free-text descriptions by LM likelihood: argmax_c log p(connector + prompt_c + EOS | description).

    Returns (class ids [N], scores [N, C]), all descriptions x classes scored in one jitted call.
    """
    table = build_text_prompt_table(encode, eos_id, descriptions, class_names, templates, connector)
    scores = np.asarray(score_class_prompts(lm_params, lm_config, table, None))[0]
    scores = scores.reshape(len(descriptions), len(class_names))
    return scores.argmax(-1), scores


def text_log_likelihoods(
    lm_params: Any,
    lm_config: lm.LMConfig,
    encode: Encoder,
    bos_id: int,
    eos_id: int,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(log-probability [N] of each text after [BOS], its EOS included; tokens scored [N]): an LM as a judge of
    texts it did not write (corpus perplexity: exp(-sum of the first / sum of the second)). Texts go through in
    batches of `batch_size`, the last one padded with copies of the first text, so one shape is compiled."""
    if not texts:
        raise ValueError("no texts to score")
    table = _table_from_pieces([[([], list(encode(text)))] for text in texts], bos_id, eos_id, score_end=True)
    ids, mask = np.asarray(table.input_ids), np.asarray(table.target_mask)
    pad = -len(texts) % batch_size
    ids = np.concatenate([ids, np.repeat(ids[:1], pad, axis=0)])
    mask = np.concatenate([mask, np.repeat(mask[:1], pad, axis=0)])
    log_probs = [
        np.asarray(
            score_class_prompts(
                lm_params, lm_config, ClassPromptTable(ids[i : i + batch_size], mask[i : i + batch_size]), None
            )
        )[0]
        for i in range(0, len(ids), batch_size)
    ]
    return np.concatenate(log_probs)[: len(texts)], np.asarray(table.target_mask).sum(axis=(1, 2))
