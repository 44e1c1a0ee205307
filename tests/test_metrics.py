"""Caption metrics reproduce published / reference-implementation values on fixed examples."""
import math

import pytest

from imgllm.captions import metrics

# NLTK's corpus_bleu docstring example (nltk.translate.bleu_score): corpus BLEU-4 = 0.5920..., and its
# sentence-level BLEU-4 of the first pair = 0.5045... (values printed there; full digits from NLTK 3.10.4).
HYP1 = ("It is a guide to action which ensures that the military always obeys the commands of the party").split()
REF1A = "It is a guide to action that ensures that the military will forever heed Party commands".split()
REF1B = ("It is the guiding principle which guarantees the military forces always being under the command of "
         "the Party").split()
REF1C = "It is the practical guide for the army always to heed the directions of the party".split()
HYP2 = "he read the book because he was interested in world history".split()
REF2A = "he was interested in world history because he read the book".split()

# A fixed 4-image example; CIDEr-D values from the coco-caption reference implementation (pycocoevalcap 1.2,
# `Cider().compute_score`, on these already-tokenised strings).
HYPS = ["a man is riding a horse on the beach", "two dogs play in the snow", "a plate of food with broccoli",
        "a red bus on a city street"]
REFS = [["a man rides a horse along the beach", "a person riding a horse on a sandy beach",
         "man on horseback at the ocean"],
        ["two dogs are playing in the snow", "a pair of dogs running through snow"],
        ["a plate with broccoli and rice", "food on a white plate", "a dish of vegetables and meat"],
        ["a double decker bus on the street", "a red bus driving down a city street", "a bus in the city"]]
COCO_CIDER_D = 2.1037362035669678
COCO_CIDER_D_PER_IMAGE = [2.2044506128377392, 2.2337962230536186, 1.381732409328933, 2.5949655690475804]
# Corpus BLEU-4 of the same example: NLTK corpus_bleu 0.29776134861292014; coco-caption's Bleu(4) (which adds
# tiny smoothing constants) 0.2977613485881511.
BLEU4_EXAMPLE = 0.29776134861292014


def test_corpus_bleu_matches_nltk_docstring():
    refs = [[REF1A, REF1B, REF1C], [REF2A]]
    assert metrics.bleu4([HYP1, HYP2], refs) == pytest.approx(0.5920778868801042, abs=1e-12)
    # The sentence-level value is the one-hypothesis corpus.
    assert metrics.bleu4([HYP1], [[REF1A, REF1B, REF1C]]) == pytest.approx(0.5045666840058485, abs=1e-12)


def test_bleu_on_strings_tokenises_like_coco():
    assert metrics.bleu4(HYPS, REFS) == pytest.approx(BLEU4_EXAMPLE, abs=1e-12)
    # Case and punctuation are ignored, as after coco-caption's PTB tokenisation step.
    shouted = [h.upper() + "." for h in HYPS]
    assert metrics.bleu4(shouted, REFS) == pytest.approx(BLEU4_EXAMPLE, abs=1e-12)


def test_bleu_zero_without_four_gram_match_and_brevity_penalty():
    assert metrics.bleu4(["a b c"], [["a b c d e f"]]) == 0.0
    # Perfect n-gram precision, half the reference length: BLEU = exp(1 - 2).
    assert metrics.bleu4(["a b c d e"], [["a b c d e a b c d e"]]) == pytest.approx(math.exp(-1.0))


def test_cider_d_matches_coco_caption_reference():
    assert metrics.cider_d(HYPS, REFS) == pytest.approx(COCO_CIDER_D, abs=1e-9)
    assert metrics.cider_d_scores(HYPS, REFS) == pytest.approx(COCO_CIDER_D_PER_IMAGE, abs=1e-9)


def test_cider_d_rewards_consensus():
    refs = [["a red circle on the left"], ["a blue square at the top"], ["a green star in the center"]]
    perfect = metrics.cider_d([r[0] for r in refs], refs)
    swapped = metrics.cider_d(["a red circle at the top", "a blue square on the left", "a green star in the center"],
                              refs)
    assert perfect > swapped > 0.0


def test_exact_match_ignores_case_spacing_and_punctuation():
    refs = [["a small red circle on the left"], ["a large blue square at the top", "a big blue square"]]
    assert metrics.exact_match(["A small red circle  on the left.", "a big blue square"], refs) == 1.0
    assert metrics.exact_match(["a small red circle on the right", "a big blue square"], refs) == 0.5


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        metrics.bleu4(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        metrics.cider_d(["a"], [[]])
    with pytest.raises(TypeError, match="single string"):
        metrics.exact_match("a cat", [["a cat"]])
