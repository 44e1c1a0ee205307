"""Label sets no model is trained on, the hand-written CIFAR-10 captions, prior-corrected scoring and caption
diversity: files checked when read, truth from the class, figures against hand computations."""

import json
import math

import jax
import numpy as np
import pytest

from imgllm import calibration
from imgllm.captions.metrics import classes_named, distinct_n, read_back, tokenize_caption
from imgllm.language import label_sets, scoring
from imgllm.language.gpt2 import GPT2Config
from imgllm.language.model import init_params
from imgllm.train import captioner

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Words of the label sets other than the classes' names: what the captions must not teach.
FUNCTION_WORDS = {"a", "an", "can", "cannot", "has", "no", "not"}


def test_packaged_label_sets_give_every_cifar10_class_a_truth():
    sets = label_sets.read_label_sets("cifar10")
    assert {"classes", "animal_or_vehicle", "mammal_bird_amphibian_vehicle", "synonyms", "can_fly", "has_fur"} <= set(
        sets
    )
    for label_set in sets.values():
        truth = label_set.truth_ids(CIFAR10, np.arange(10))
        assert truth.shape == (10,) and set(truth) <= set(range(len(label_set.labels)))
    assert sets["classes"].truth_ids(CIFAR10, np.arange(10)).tolist() == list(range(10))
    synonyms = sets["synonyms"]
    assert [synonyms.labels[i] for i in synonyms.truth_ids(CIFAR10, [0, 1, 3, 5, 8, 9])] == [
        "plane",
        "car",
        "kitten",
        "puppy",
        "boat",
        "lorry",
    ]
    can_fly = sets["can_fly"]
    assert [can_fly.labels[i] for i in can_fly.truth_ids(CIFAR10, [0, 2, 7])] == ["can fly", "can fly", "cannot fly"]


def test_cifar10_captions_name_their_class_and_none_of_the_unseen_labels():
    """The captions the SmolLM2 captioner trains on never use a word the unseen label sets test (car, boat, animal,
    fly, fur...), so the label-set figures measure what the LM knew; each names its own class."""
    captions = label_sets.read_class_captions("cifar10", CIFAR10)
    sets = label_sets.read_label_sets("cifar10")
    taught = {word for name in CIFAR10 for word in tokenize_caption(name)} | FUNCTION_WORDS
    unseen = {word for s in sets.values() for label in s.labels for word in tokenize_caption(label)} - taught
    assert {"car", "plane", "boat", "lorry", "kitten", "puppy", "animal", "vehicle", "fly", "fur"} <= unseen
    for class_id, name in enumerate(CIFAR10):
        assert len(captions[name]) >= 5
        for caption in captions[name]:
            words = set(tokenize_caption(caption))
            assert not words & unseen, (caption, words & unseen)
            assert classes_named(caption, [(c,) for c in CIFAR10]) == [class_id], caption


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1]", "expected a JSON object"),
        ("{", "not JSON"),
        ('{"s": {"labels": ["x", "y"], "templates": ["a {label}."]}}', "exactly labels, templates and truth"),
        ('{"s": {"labels": ["x", "y"], "templates": ["a photo."], "truth": {"cat": "x"}}}', "no '{label}' field"),
        ('{"s": {"labels": ["x", "x"], "templates": ["a {label}."], "truth": {"cat": "x"}}}', "'x' is repeated"),
        ('{"s": {"labels": ["x", ""], "templates": ["a {label}."], "truth": {"cat": "x"}}}', "not a non-empty string"),
        ('{"s": {"labels": ["x", "y"], "templates": ["a {label}."], "truth": {"cat": "z"}}}', r"truth.cat: 'z' is not"),
        ("{}", "no label set"),
    ],
)
def test_bad_label_set_files_are_refused_naming_file_and_key(tmp_path, content, match):
    path = tmp_path / "sets.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as error:
        label_sets.read_label_sets(str(path))
    assert str(path) in str(error.value)


def test_label_set_without_a_class_truth_and_bad_caption_files(tmp_path):
    path = tmp_path / "sets.json"
    path.write_text('{"s": {"labels": ["x", "y"], "templates": ["a {label}."], "truth": {"cat": "x"}}}')
    with pytest.raises(ValueError, match="gives no truth for class 'dog'"):
        label_sets.read_label_sets(str(path))["s"].truth_ids(["cat", "dog"], [0, 1])
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"cat": ["a cat."], "cow": ["a cow."]}))
    with pytest.raises(ValueError, match="'cow' is not a class"):
        label_sets.read_class_captions(str(captions), ["cat", "dog"])
    captions.write_text(json.dumps({"cat": ["a cat."]}))
    with pytest.raises(ValueError, match="no captions for class 'dog'"):
        label_sets.read_class_captions(str(captions), ["cat", "dog"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        label_sets.read_class_captions(str(tmp_path / "missing.json"), ["cat"])
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (label_sets.MAX_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="more than"):
        label_sets.read_label_sets(str(big))


def test_class_caption_rows_pick_captions_of_the_image_class_or_templates():
    class_captions = {"circle": ("a round thing.", "a circle."), "square": ("a box.",)}
    labels = np.array([0, 1, 0, 1] * 50)
    rows, texts = captioner.caption_rows(
        None, labels, ("circle", "square"), ("a photo of a {label}.",), 0.25, seed=3, class_captions=class_captions
    )
    assert list(rows) == list(range(200))
    templates = {"a photo of a circle.", "a photo of a square."}
    for label, text in zip(labels, texts):
        own = set(class_captions[("circle", "square")[label]]) | {f"a photo of a {('circle', 'square')[label]}."}
        assert text in own
    share = np.mean([t in templates for t in texts])
    assert 0.15 < share < 0.35
    assert {t for t in texts if t not in templates} == {"a round thing.", "a circle.", "a box."}
    assert (
        captioner.caption_rows(
            None, labels, ("circle", "square"), ("a photo of a {label}.",), 0.25, seed=3, class_captions=class_captions
        )[1]
        == texts
    )


def test_prior_correction_against_a_hand_computation():
    # Two labels; label 1's prompt is likelier whatever the image (the LM's prior), which the correction removes.
    train_scores = np.log(np.array([[0.1, 0.4], [0.3, 0.6]]))
    prior = calibration.marginal_log_prior(train_scores)
    np.testing.assert_allclose(prior, np.log([0.2, 0.5]))  # log of the mean probability
    scores = np.log(np.array([[0.3, 0.5], [0.1, 0.6], [0.15, 0.3], [0.25, 0.4]]))
    labels = np.array([0, 1, 0, 0])
    assert (scores.argmax(-1) == labels).mean() == 0.25  # plain likelihood: label 1 always
    corrected = calibration.prior_corrected_scores(scores, prior, 1.0)
    # image 0: log .3 - log .2 = 0.405 > log .5 - log .5 = 0: label 0; image 2: log .75 = -0.29 > log .6 = -0.51.
    np.testing.assert_allclose(corrected[0], [math.log(1.5), 0.0])
    assert corrected.argmax(-1).tolist() == [0, 1, 0, 0]
    # Label 0 wins image i once weight > log(p1/p0 of the image) / log(.5/.2): images 3, 0, 2 flip at 0.513, 0.557,
    # 0.756 (image 1 at 1.96, past the grid): the smallest grid weight with all four right is 0.8.
    assert calibration.fit_prior_weight(scores, prior, labels) == 0.8
    predictions, weights = calibration.held_out_prior_predictions(np.tile(scores, (2, 1)), prior, np.tile(labels, 2))
    assert len(weights) == 2 and predictions.shape == (8,)
    with pytest.raises(ValueError, match="non-finite"):
        calibration.marginal_log_prior(np.array([[0.0, np.nan]]))


def test_label_set_report_compares_the_lm_with_the_cnn_on_the_same_images():
    truth = np.array([0, 0, 1, 1, 0, 1, 0, 1, 0, 0])
    scores = np.zeros((10, 2))
    scores[np.arange(10), truth] = 1.0
    scores[[0, 1], :] = [[0.0, 1.0], [0.0, 1.0]]  # the LM is wrong on images 0 and 1
    cnn = truth.copy()
    cnn[[5]] = 0  # the CNN is wrong on image 5
    report = label_sets.label_set_report(scores, truth, prior_scores=np.zeros((4, 2)), cnn_predictions=cnn)
    assert report["lm_accuracy"] == 0.8 and report["cnn_accuracy"] == 0.9
    assert report["mcnemar_cnn_lm_cnn_only"] == 2 and report["mcnemar_cnn_lm_lm_only"] == 1
    assert report["mcnemar_cnn_lm_p"] == 1.0  # 2 vs 1 discordant: 2 * P(X <= 1 | Bin(3, 1/2)) = 1
    assert report["alpha"] == 0.0 and report["prior_gain"] == 0.0  # a flat prior changes nothing
    low, high = report["lm_accuracy_ci_low"], report["lm_accuracy_ci_high"]
    assert low < 0.8 < high


def test_distinct_n_and_read_back_by_hand():
    captions = ["a red car.", "a red car.", "a blue ship"]
    assert distinct_n(captions, 1) == 5 / 9  # a, red, car, blue, ship of 9 words
    assert distinct_n(captions, 2) == 4 / 6  # (a red), (red car), (a blue), (blue ship)
    assert distinct_n(["one"], 2) == 0.0
    names = [("automobile", "car"), ("ship",), ("fire truck",)]
    assert classes_named("A Fire-truck and a car", names) == [0]  # "fire-truck" is one PTB token
    assert classes_named("a fire truck beside a ship.", names) == [1, 2]
    assert classes_named("a cart", names) == []  # whole words only
    figures = read_back(captions, [0, 1, 0], names)
    assert figures == {"names_predicted": 1 / 3, "names_other": 2 / 3, "names_none": 0.0}
    with pytest.raises(ValueError, match="one predicted class per caption"):
        read_back(captions, [0], names)


def test_text_log_likelihoods_equal_the_token_sums_whatever_the_batch():
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    params = init_params(config, jax.random.PRNGKey(0))
    encode = lambda text: [ord(c) - 96 for c in text]
    texts = ["abc", "de", "fghij"]
    log_probs, tokens = scoring.text_log_likelihoods(params, config, encode, 0, 0, texts, batch_size=2)
    assert tokens.tolist() == [4, 3, 6]  # the letters and the EOS
    for text, value in zip(texts, log_probs):
        ids = np.array([[0] + encode(text) + [0]])
        expected = scoring.prefixed_token_log_probs(params, config, None, ids).sum()
        np.testing.assert_allclose(value, expected, rtol=1e-5)
    again, _ = scoring.text_log_likelihoods(params, config, encode, 0, 0, texts, batch_size=3)
    np.testing.assert_allclose(again, log_probs, rtol=1e-5)
