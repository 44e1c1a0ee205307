"""Classification by the language model among any labels chosen at inference, the LM and fused classifiers with the
checkpoint's calibration, and what records keep (caption scores, the LM's per-label probabilities).

Every figure is checked against a reference computed another way: the prompts' likelihoods summed token by token,
the mixture over templates by hand, the fused probabilities by `imgllm.calibration` in numpy."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_infer import caption, read_jsonl, run_infer_main, write_images
from test_pipeline import random_images, tiny_lm_config, tiny_params, tiny_pipeline, tiny_pipeline_parts, tiny_tokenizer

from imgllm import calibration
from imgllm.language import scoring
from imgllm.pipeline import caption_images, classify_images
from imgllm.pipeline import checkpoint as pc
from imgllm.pipeline.caption import class_log_probs as pipeline_class_log_probs
from imgllm.pipeline.caption import cnn_logits_and_features, visual_prefix
from imgllm.pipeline.outputs import OutputError

COLOURS = ["red", "dark green", "blue"]  # "dark green": a label of several tokens
TEMPLATES = ["a small {label}", "a large {label}"]  # caption beginnings: their end is not scored


def encode(text):
    return tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]


token_log_probs = jax.jit(scoring.prefixed_token_log_probs, static_argnums=1)


def prompt_log_prob(prefix, ids) -> float:
    """log p(ids | prefix, BOS), summed token by token from the LM's next-token distributions."""
    lm_params, config = tiny_params(bridge=True)["lm"], tiny_lm_config()
    eos = tiny_tokenizer().eos_token_id
    sequence = jnp.asarray([[eos] + list(ids)], jnp.int32)
    return float(token_log_probs(lm_params, config, prefix[None], sequence).sum())


def test_several_templates_are_a_mixture_and_open_templates_leave_the_end_unscored():
    eos = tiny_tokenizer().eos_token_id
    prefix = jax.random.normal(jax.random.PRNGKey(0), (2, tiny_lm_config().n_embd))
    assert len(encode(" dark green")) > 1
    assert not scoring.template_is_whole_text("a small {label}") and scoring.template_is_whole_text("a {label}.")
    table = scoring.build_prompt_table(encode, eos, COLOURS, TEMPLATES, score_end=None)
    scores = np.asarray(
        scoring.score_class_prompts(tiny_params(bridge=True)["lm"], tiny_lm_config(), table, prefix[None])
    )[0]
    for label, score in zip(COLOURS, scores):
        per_template = [prompt_log_prob(prefix, encode(t.format(label=label))) for t in TEMPLATES]
        expected = np.logaddexp(*per_template) - math.log(2)  # log of the mean likelihood of the prompts
        assert score == pytest.approx(expected, abs=1e-4)
    whole = scoring.build_prompt_table(encode, eos, COLOURS, TEMPLATES, score_end=True)
    with_end = np.asarray(
        scoring.score_class_prompts(tiny_params(bridge=True)["lm"], tiny_lm_config(), whole, prefix[None])
    )[0]
    per_template = [prompt_log_prob(prefix, encode(t.format(label="red")) + [eos]) for t in TEMPLATES]
    assert with_end[0] == pytest.approx(np.logaddexp(*per_template) - math.log(2), abs=1e-4)
    assert with_end[0] < scores[0]  # the EOS costs probability


def test_each_template_decides_whether_its_end_is_scored():
    """A mixture of a whole caption and a caption's beginning: the first scores its EOS, the second does not."""
    eos = tiny_tokenizer().eos_token_id
    table = scoring.build_prompt_table(
        encode, eos, COLOURS, ["a photo of a {label}.", "a small {label}"], score_end=None
    )
    for c, colour in enumerate(COLOURS):
        for e, text in enumerate([f"a photo of a {colour}.", f"a small {colour}"]):
            scored = len(encode(text)) + (e == 0)  # + the EOS of the whole caption alone
            assert table.target_mask[c, e].sum() == scored, (colour, text)


@pytest.mark.parametrize(
    "labels, templates, message",
    [
        (["red", "red"], TEMPLATES, "'red' is repeated"),
        (["red", " "], TEMPLATES, "non-empty"),
        (COLOURS, ["a {colour} {label}"], "only field"),
        (COLOURS, ["a colour"], "has no '{label}'"),
    ],
)
def test_bad_label_sets_and_templates_are_named(labels, templates, message):
    with pytest.raises(ValueError, match=message):
        scoring.build_prompt_table(encode, 0, labels, templates)


@pytest.fixture
def loaded(tmp_path):
    """A tiny pipeline with a bridge and a calibration as a captioner's export stores it."""
    loaded = tiny_pipeline(tmp_path, bridge=True, template="")
    loaded.config.update(cnn_temperature=1.5, lm_temperature=2.0, fusion_weight=0.7, fusion_temperature=1.3)
    return loaded


def lm_reference(loaded, images, labels, templates, *, information_gain=False, score_end=None):
    """The LM's label scores [N, L] from the stages run one by one."""
    spec = loaded.spec()
    features = cnn_logits_and_features(loaded.params["cnn"], images, spec)[1]
    table = scoring.build_prompt_table(
        loaded.tokenizer.encode, loaded.config["eos_id"], labels, templates, score_end=score_end
    )
    score = lambda prefix: np.asarray(scoring.score_class_prompts(loaded.params["lm"], spec.lm_config, table, prefix))
    scores = score(visual_prefix(loaded.params, features, spec))
    if information_gain:
        scores = scores - score(visual_prefix(loaded.params, jnp.zeros_like(features[:1]), spec))
    return scores


def test_lm_labels_give_the_label_and_calibrated_probabilities_of_each(loaded):
    images = random_images(1, 6)
    spec = loaded.spec(lm_labels=COLOURS, lm_templates=TEMPLATES)
    out = jax.device_get(
        jax.jit(functools.partial(caption_images, spec=spec))(loaded.params, images, jax.random.PRNGKey(0))
    )
    expected = lm_reference(loaded, images, COLOURS, TEMPLATES)
    np.testing.assert_allclose(out["lm_scores"], expected, atol=1e-4)
    np.testing.assert_array_equal(out["lm_label_ids"], expected.argmax(-1))
    np.testing.assert_allclose(out["lm_probs"], np.exp(calibration.log_softmax(expected, 2.0)), atol=1e-5)
    # The Python API computes the same without captioning (batches of 4: the last one padded).
    api = classify_images(loaded, images, COLOURS, TEMPLATES, batch_size=4)
    assert api.names == tuple(COLOURS) and api.labels == [COLOURS[i] for i in expected.argmax(-1)]
    np.testing.assert_allclose(api.probs, out["lm_probs"], atol=1e-5)


def test_information_gain_removes_the_score_after_a_neutral_prefix(loaded):
    images = random_images(5, 4)
    gain = classify_images(loaded, images, COLOURS, TEMPLATES, lm_scoring="information_gain")
    expected = lm_reference(loaded, images, COLOURS, TEMPLATES, information_gain=True)
    np.testing.assert_allclose(gain.scores, expected, atol=1e-4)
    likelihood = classify_images(loaded, images, COLOURS, TEMPLATES)
    assert not np.allclose(gain.scores, likelihood.scores)  # the neutral prefix's scores are not zero


FITTED = {"head_temperature": 1.5, "lm_temperature": 2.0, "fusion_weight": 0.7, "fusion_temperature": 1.3}


@pytest.mark.parametrize("classify", ["cnn", "lm", "fused"])
def test_class_log_probs_are_the_calibrated_classifier_spec_classify_names(loaded, classify):
    """The jitted formula (`class_log_probs`) is `imgllm.calibration`'s numpy one, with the checkpoint's values."""
    rng = np.random.default_rng(0)
    logits, lm_scores = rng.normal(size=(5, 10)) * 4, rng.normal(size=(5, 10)) * 3
    got = pipeline_class_log_probs(
        jnp.asarray(logits, jnp.float32), jnp.asarray(lm_scores, jnp.float32), loaded.spec(classify=classify)
    )
    expected = calibration.calibrated_log_probs(FITTED, logits, lm_scores)[classify]
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_fused_labels_label_the_caption_and_come_with_the_lms(loaded):
    images = random_images(2, 8)
    spec = loaded.spec(classify="fused")
    out = jax.device_get(
        jax.jit(functools.partial(caption_images, spec=spec))(loaded.params, images, jax.random.PRNGKey(0))
    )
    lm_scores = lm_reference(
        loaded, images, list(loaded.class_names), list(loaded.class_prompt_templates), score_end=True
    )
    expected = np.exp(calibration.calibrated_log_probs(FITTED, out["logits"], lm_scores)["fused"])
    top = np.argsort(-expected, axis=1, kind="stable")[:, : spec.top_k]
    np.testing.assert_array_equal(out["label_ids"], top)
    np.testing.assert_allclose(out["label_probs"], np.take_along_axis(expected, top, 1), atol=1e-5)
    np.testing.assert_array_equal(out["lm_label_ids"], lm_scores.argmax(-1))  # the LM's label comes with them


def test_information_gain_changes_the_lms_label_only_and_applies_no_likelihood_temperature(loaded):
    """Calibration was fitted on likelihood scores: the fused labels keep them, and information-gain lm_probs are not
    divided by a temperature fitted on other scores."""
    images = random_images(2, 8)
    spec = loaded.spec(classify="fused", lm_scoring="information_gain")
    out = jax.device_get(
        jax.jit(functools.partial(caption_images, spec=spec))(loaded.params, images, jax.random.PRNGKey(0))
    )
    names, templates = list(loaded.class_names), list(loaded.class_prompt_templates)
    likelihood = lm_reference(loaded, images, names, templates, score_end=True)
    fused = np.exp(calibration.calibrated_log_probs(FITTED, out["logits"], likelihood)["fused"])
    top = np.argsort(-fused, axis=1, kind="stable")[:, : spec.top_k]
    np.testing.assert_array_equal(out["label_ids"], top)  # as with likelihood scoring
    gain = lm_reference(loaded, images, names, templates, information_gain=True, score_end=True)
    np.testing.assert_allclose(out["lm_scores"], gain, atol=1e-4)
    np.testing.assert_allclose(out["lm_probs"], np.exp(calibration.log_softmax(gain)), atol=1e-5)  # T = 1


def test_classifying_by_the_lm_needs_a_bridge(tmp_path):
    plain = tiny_pipeline(tmp_path)
    for options in ({"classify": "fused"}, {"lm_labels": COLOURS}):
        with pytest.raises(ValueError, match="no bridge"):
            plain.spec(**options)
    with pytest.raises(ValueError, match="give the labels too"):
        tiny_pipeline(tmp_path, bridge=True, template="").spec(lm_templates=TEMPLATES)


@pytest.fixture(scope="module")
def bridge_checkpoint(tmp_path_factory) -> str:
    params, config = tiny_pipeline_parts(bridge=True, template="", max_new_tokens=4)
    config.update(lm_temperature=2.0)
    return pc.save_pipeline_checkpoint(tmp_path_factory.mktemp("bridge") / "ckpt", params, config, tiny_tokenizer())


def test_records_keep_caption_scores_and_lm_probabilities_and_resume_refuses_other_labels(bridge_checkpoint, tmp_path):
    paths = write_images(tmp_path / "imgs", 5, seed=4)
    options = dict(batch_size=4, lm_labels=COLOURS, lm_templates=TEMPLATES)
    out = tmp_path / "out.jsonl"
    records = caption(bridge_checkpoint, tmp_path / "imgs", output=out, **options)
    assert [r["path"] for r in records] == paths and read_jsonl(out) == records
    for record in records:
        assert set(record["lm_probs"]) == set(COLOURS) and sum(record["lm_probs"].values()) == pytest.approx(1, 1e-3)
        assert record["lm_label"] == max(record["lm_probs"], key=record["lm_probs"].get)
        assert len(record["caption_scores"]) == 1 and record["caption_scores"][0] <= 0.0
    with pytest.raises(OutputError, match="lm_labels was"):
        caption(bridge_checkpoint, tmp_path / "imgs", output=out, **{**options, "lm_labels": ["red", "blue"]})
    with pytest.raises(OutputError, match="lm_label_prompts was"):
        caption(bridge_checkpoint, tmp_path / "imgs", output=out, **{**options, "lm_templates": ["a {label}"]})
    # CSV keeps each caption's score and the LM label's probability, and reads them back to resume.
    csv_out = tmp_path / "out.csv"
    first = caption(bridge_checkpoint, tmp_path / "imgs", output=csv_out, **options)
    header = csv_out.read_text().splitlines()[0].split(",")
    assert {"caption_1", "score_1", "lm_label", "lm_prob"} <= set(header)
    again = caption(bridge_checkpoint, tmp_path / "imgs", output=csv_out, **options)
    for before, after in zip(first, again):
        assert after["caption_scores"] == pytest.approx(before["caption_scores"], abs=1e-4)
        assert after["lm_probs"][after["lm_label"]] == pytest.approx(before["lm_probs"][before["lm_label"]], abs=1e-4)


def test_cli_label_lists_are_checked_in_one_line(bridge_checkpoint, tmp_path):
    image = write_images(tmp_path / "imgs", 1)[0]
    status, lines = run_infer_main(image, "--checkpoint", bridge_checkpoint, "--lm-labels", "red,,blue", "--quiet")
    assert status == 2 and lines == [
        "infer.py: error: --lm-labels='red,,blue': an empty item (separate items with ',')"
    ], lines
    status, lines = run_infer_main(
        image, "--checkpoint", bridge_checkpoint, "--lm-labels", "red,blue", "--lm-templates", "a {colour}", "--quiet"
    )
    assert status == 2 and len(lines) == 1 and "a {colour}" in lines[0], lines
