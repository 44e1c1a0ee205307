"""LM classification: all classes in one jitted call equal scoring each class alone; the score is the ensemble
log-likelihood computed token by token."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables  # seeded weights without compiling initialisers

from imgllm.language import scoring
from imgllm.language.gpt2 import GPT2, GPT2Config, init_params

jax.config.update("jax_enable_x64", False)

CLASSES = ["cat", "dog", "horse_truck"]
WORDS = {w: i for i, w in enumerate("a photo picture of an image cat dog horse truck . this is".split(), start=1)}


def encode(text: str) -> list[int]:
    """A tiny word-level encoder (ids 1..), enough to make prompts of different lengths."""
    return [WORDS[w] for w in text.replace(".", " .").split()]


@pytest.fixture(scope="module")
def model():
    """A tiny GPT-2 with seeded random weights and 5 random visual prefixes of 3 embeddings."""
    config = GPT2Config.tiny(vocab_size=16, bos_token_id=0, eos_token_id=0)
    params = random_variables(lambda: init_params(config, jax.random.key(0)), seed=0)
    prefix = np.random.default_rng(2).standard_normal((5, 3, config.n_embd)).astype(np.float32)
    return config, params, prefix


def test_prompt_table_layout():
    table = scoring.build_prompt_table(encode, 0, CLASSES, ("a photo of a {label}.", "an image of a {label}."))
    assert table.input_ids.shape == (3, 2, 1 + 7 + 1)  # BOS + longest prompt ("... horse truck .") + EOS
    np.testing.assert_array_equal(table.input_ids[0, 0, :8], [0] + encode("a photo of a cat.") + [0])
    # Scored targets: every prompt token and the EOS; padding is not.
    np.testing.assert_array_equal(table.target_mask.sum(-1), [[7, 7], [7, 7], [8, 8]])


def test_all_classes_at_once_equal_each_class_alone(model):
    config, params, prefix = model
    table = scoring.build_prompt_table(encode, 0, CLASSES)
    together = np.asarray(scoring.score_class_prompts(params, config, table, prefix, images_per_chunk=2))
    assert together.shape == (5, 3)
    alone = [
        np.asarray(scoring.score_class_prompts(params, config, scoring.build_prompt_table(encode, 0, [c]), prefix))[
            :, 0
        ]
        for c in CLASSES
    ]
    np.testing.assert_allclose(together, np.stack(alone, 1), rtol=1e-5, atol=1e-5)
    # Images do not interact: scoring one image alone gives its row.
    single = scoring.score_class_prompts(params, config, table, prefix[2:3])
    np.testing.assert_allclose(single[0], together[2], rtol=1e-5, atol=1e-5)


def test_score_is_template_averaged_likelihood(model):
    config, params, prefix = model
    templates = ("a photo of a {label}.", "this is a {label}.")
    table = scoring.build_prompt_table(encode, 0, ["dog"], templates)
    got = float(scoring.score_class_prompts(params, config, table, prefix[:1])[0, 0])
    # Direct computation: run the LM on [prefix, BOS, prompt, EOS] and add up log-softmax of each next token.
    model_ = GPT2(config)
    forward = jax.jit(
        lambda ids: jax.nn.log_softmax(
            model_.apply(
                {"params": params},
                inputs_embeds=jnp.concatenate(
                    [prefix[:1], model_.apply({"params": params}, ids, method=GPT2.embed_tokens)], 1
                ),
            )[0]
        )
    )
    likelihoods = []
    for template in templates:
        ids = np.array([[0] + encode(template.format(label="dog")) + [0]])
        log_probs = np.asarray(forward(ids)[0, prefix.shape[1] : -1])
        likelihoods.append(float(sum(log_probs[t, ids[0, t + 1]] for t in range(ids.shape[1] - 1))))
    expected = np.logaddexp.reduce(likelihoods) - math.log(len(templates))
    assert got == pytest.approx(expected, abs=1e-4)


def test_one_compile_for_new_prefixes(model):
    config, params, prefix = model
    table = scoring.build_prompt_table(encode, 0, CLASSES)
    scoring.score_class_prompts(params, config, table, prefix)
    before = scoring.score_class_prompts._cache_size()
    scoring.score_class_prompts(params, config, table, prefix + 1.0)
    assert scoring.score_class_prompts._cache_size() == before


def test_classify_texts_scores_only_the_class_prompt(model):
    config, params, _ = model
    labels, scores = scoring.classify_texts(
        params, config, encode, 0, ["a photo of a dog", "a cat"], CLASSES, connector=" this is"
    )
    assert scores.shape == (2, 3) and labels.shape == (2,)
    np.testing.assert_array_equal(labels, scores.argmax(-1))
    # Same as scoring [BOS] description + connector + " {label}." with the context tokens masked out.
    table = scoring.build_text_prompt_table(encode, 0, ["a cat"], CLASSES, connector=" this is")
    assert table.target_mask[1, 0].sum() == len(encode(" dog.")) + 1
    np.testing.assert_allclose(scores[1], scoring.score_class_prompts(params, config, table, None)[0], rtol=1e-5)


def test_bad_templates_and_descriptions():
    with pytest.raises(ValueError, match="no '{label}' field"):
        scoring.build_prompt_table(encode, 0, CLASSES, ("a photo",))
    with pytest.raises(ValueError, match="description 1"):
        scoring.build_text_prompt_table(encode, 0, ["a cat", "  "], CLASSES)
