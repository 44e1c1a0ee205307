"""Caption metrics reproduce published / reference-implementation values on fixed examples."""

import json
import math

import pytest

from imgllm.captions import metrics
from imgllm.pipeline.records import score_records

# NLTK's corpus_bleu docstring example (nltk.translate.bleu_score): corpus BLEU-4 = 0.5920..., and its
# sentence-level BLEU-4 of the first pair = 0.5045... (values printed there; full digits from NLTK 3.10.4).
HYP1 = ("It is a guide to action which ensures that the military always obeys the commands of the party").split()
REF1A = "It is a guide to action that ensures that the military will forever heed Party commands".split()
REF1B = (
    "It is the guiding principle which guarantees the military forces always being under the command of the Party"
).split()
REF1C = "It is the practical guide for the army always to heed the directions of the party".split()
HYP2 = "he read the book because he was interested in world history".split()
REF2A = "he was interested in world history because he read the book".split()

# A fixed 4-image example; CIDEr-D values from the coco-caption reference implementation (pycocoevalcap 1.2,
# `Cider().compute_score`, on these already-tokenised strings).
HYPS = [
    "a man is riding a horse on the beach",
    "two dogs play in the snow",
    "a plate of food with broccoli",
    "a red bus on a city street",
]
REFS = [
    [
        "a man rides a horse along the beach",
        "a person riding a horse on a sandy beach",
        "man on horseback at the ocean",
    ],
    ["two dogs are playing in the snow", "a pair of dogs running through snow"],
    ["a plate with broccoli and rice", "food on a white plate", "a dish of vegetables and meat"],
    ["a double decker bus on the street", "a red bus driving down a city street", "a bus in the city"],
]
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
    swapped = metrics.cider_d(
        ["a red circle at the top", "a blue square on the left", "a green star in the center"], refs
    )
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


# coco-caption's tokenisation. The expected strings are what pycocoevalcap 1.2's PTBTokenizer (the Stanford CoreNLP
# 3.4.1 jar it bundles, run by OpenJDK 17.0.19) returned for these captions, all tokenised in one call, on
# 2026-12-01. Tokens are lower case, its punctuation tokens are gone, brackets stay as -lrb- -rrb- -lsb- -rsb-,
# and "5 1/2" is one token with a no-break space (U+00A0) inside.
COCO_TOKENISED = [
    ("A black-and-white photo of a cat that isn't happy.", "a black-and-white photo of a cat that is n't happy"),
    (
        "I don't know why the cat's bowl can't hold it; it won't fit!",
        "i do n't know why the cat 's bowl ca n't hold it it wo n't fit",
    ),
    (
        "It's 10 o'clock: the 3-year-old's T-shirt is on the X-ray table.",
        "it 's 10 o'clock the 3-year-old 's t-shirt is on the x-ray table",
    ),
    ("DON'T PANIC -- IT'S ONLY A DOG'S TOY...", "do n't panic it 's only a dog 's toy"),
    (
        'A man (left) and a woman [right] hold a "Stop" sign.',
        "a man -lrb- left -rrb- and a woman -lsb- right -rsb- hold a stop sign",
    ),
    (
        "Two dogs' bowls, 1,000 beads, $5.50 and 50% off at 3:30 p.m.",
        "two dogs bowls 1,000 beads $ 5.50 and 50 % off at 3:30 p.m.",
    ),
    (
        "She said \u2018hello\u2019 and \u201cgoodbye\u201d \u2014 then left\u2026 ma'am, y'all, rock 'n' roll",
        "she said hello and goodbye then left ma'am y' all rock 'n' roll",
    ),
    (
        "We're gonna watch the '90s show; I'm sure they'll love it, wanna come?",
        "we 're gon na watch the '90s show i 'm sure they 'll love it wan na come",
    ),
    (
        "Mr. Smith and Dr. Jones visit St. Louis in the U.S. The end.",
        "mr. smith and dr. jones visit st. louis in the u.s. the end",
    ),
    (
        "A 5 1/2 inch pizza, \u00bd price, 12/25/2012 by e-mail, AT&T and R&D",
        "a 5\u00a01/2 inch pizza 1/2 price 12/25/2012 by e-mail at&t and r&d",
    ),
    (
        "cannot, shouldn't've, 'tis, o'er, Qur'an, O'Neill, d'Avignon",
        "can not should n't 've 't is o'er qur an o'neill d'avignon",
    ),
    (
        "A cat/dog hybrid?! No way... :) #cute @home www.example.com",
        "a cat/dog hybrid ?! no way :-rrb- #cute @home www.example.com",
    ),
    (
        "Fig. 3 shows a sq. ft. chart, no. 5 and vs. the Jan. sales etc.",
        "fig. 3 shows a sq. ft. chart no. 5 and vs. the jan. sales etc.",
    ),
    (
        "A caf\u00e9 in Z\u00fcrich serves na\u00efve cr\u00eapes & colour-ful \u00c9CLAIRS",
        "a caf\u00e9 in z\u00fcrich serves na\u00efve cr\u00eapes & colour-ful \u00e9clairs",
    ),
    (
        "A sign with an X. The man waits by the letter B. He is tall",
        "a sign with an x the man waits by the letter b he is tall",
    ),
    (
        "A 2x4 board, 3D glasses, a 4k TV, a 100m sprint and a 1990s-era radio",
        "a 2x4 board 3d glasses a 4k tv a 100m sprint and a 1990s-era radio",
    ),
    ("-5 degrees, +3 points, .5 inch, 10-20 people, x-5", "-5 degrees +3 points .5 inch 10-20 people x-5"),
    ("  lots   of\tspaces\nand a newline  ", "lots of spaces and a newline"),
    ("it\u2019s a dog\u2019s life, isn\u2019t it?", "it 's a dog 's life is n't it"),
]


@pytest.mark.parametrize("caption, expected", COCO_TOKENISED)
def test_ptb_tokenize_matches_coco_caption(caption, expected):
    assert metrics.ptb_tokenize(caption) == expected


def test_ptb_tokens_before_lowercasing_and_punctuation_removal():
    # The 3.4.1 jar's own output (PTBTokenizer -preserveLines) for these lines, one by one.
    assert metrics.ptb_tokens('"Hi," he said (twice) -- at 5 1/2 p.m., then left.') == [
        "``",
        "Hi",
        ",",
        "''",
        "he",
        "said",
        "-LRB-",
        "twice",
        "-RRB-",
        "--",
        "at",
        "5\u00a01/2",
        "p.m.",
        ",",
        "then",
        "left",
        ".",
    ]
    assert metrics.ptb_tokens("Mr. Jones' 3-year-old isn't gonna see the U.S. The end...") == [
        "Mr.",
        "Jones",
        "'",
        "3-year-old",
        "is",
        "n't",
        "gon",
        "na",
        "see",
        "the",
        "U.S.",
        ".",
        "The",
        "end",
        "...",
    ]


def test_tokenize_caption_splits_words_as_coco_scorers_do():
    # pycocoevalcap's Bleu and Cider split the tokenised string at any white space, the no-break space included.
    assert metrics.tokenize_caption("A 5 1/2 inch pizza isn't") == ["a", "5", "1/2", "inch", "pizza", "is", "n't"]
    assert metrics.tokenize_caption(["Already", "split,"]) == ["Already", "split,"]
    assert metrics.normalize_caption("The cat's  black-and-white!") == "the cat 's black-and-white"


# Six images, three references each, with hyphens, contractions, punctuation, numbers and capitals. Reference
# scores from pycocoevalcap 1.2 on 2026-12-01: its PTBTokenizer (CoreNLP 3.4.1 jar) on the references and on the
# hypotheses, then Bleu(4).compute_score and Cider().compute_score (Cider is CIDEr-D). The tokenisation imgllm had
# before (a regex splitting hyphens, keeping "isn't") gave BLEU-4 0.4244 and CIDEr-D 2.5959 here.
COCO_IMAGES = [
    (
        "A black-and-white photo of a cat that isn't happy.",
        [
            "A black and white photo of an unhappy cat.",
            "A black-and-white cat sitting on a wooden chair, looking grumpy.",
            "The cat isn't happy; it's sitting in a black-and-white photo.",
        ],
    ),
    (
        "Two men don't look at the 3-year-old's kite.",
        [
            "Two men look up at a child's red kite!",
            "A 3-year-old boy can't fly his kite, so two men help.",
            "Two adults and a 3-year-old flying a kite in the park.",
        ],
    ),
    (
        "A clock on the tower says it's 10 o'clock.",
        [
            "A large clock tower showing 10 o'clock.",
            "The clock on the tower reads ten o'clock.",
            "It's 10 o'clock on the big clock tower in the city.",
        ],
    ),
    (
        "A man in a T-shirt won't eat his pizza (pepperoni).",
        [
            "A man in a white T-shirt eating a slice of pepperoni pizza.",
            "The man won't finish the pizza -- it's too big!",
            "A man sits at a table with a pizza (with pepperoni) and a soda.",
        ],
    ),
    (
        "The dog's frisbee is on the grass... near a well-known U.S. park",
        [
            "A dog's frisbee lying on the grass in a U.S. park.",
            "A brown dog drops its frisbee on the green grass.",
            "Frisbee on the grass: the dog can't find it.",
        ],
    ),
    (
        "a red double-decker bus on a city street in St. Louis",
        [
            "A red double-decker bus drives down a city street.",
            "A double decker bus on a street in St. Louis, MO.",
            "A RED BUS ON THE STREET, WITH PEOPLE WAITING.",
        ],
    ),
]
COCO_IMAGES_TOKENISED = {  # pycocoevalcap's PTBTokenizer output for COCO_IMAGES (hypothesis, references)
    0: (
        "a black-and-white photo of a cat that is n't happy",
        [
            "a black and white photo of an unhappy cat",
            "a black-and-white cat sitting on a wooden chair looking grumpy",
            "the cat is n't happy it 's sitting in a black-and-white photo",
        ],
    ),
    1: (
        "two men do n't look at the 3-year-old 's kite",
        [
            "two men look up at a child 's red kite",
            "a 3-year-old boy ca n't fly his kite so two men help",
            "two adults and a 3-year-old flying a kite in the park",
        ],
    ),
    2: (
        "a clock on the tower says it 's 10 o'clock",
        [
            "a large clock tower showing 10 o'clock",
            "the clock on the tower reads ten o'clock",
            "it 's 10 o'clock on the big clock tower in the city",
        ],
    ),
    3: (
        "a man in a t-shirt wo n't eat his pizza -lrb- pepperoni -rrb-",
        [
            "a man in a white t-shirt eating a slice of pepperoni pizza",
            "the man wo n't finish the pizza it 's too big",
            "a man sits at a table with a pizza -lrb- with pepperoni -rrb- and a soda",
        ],
    ),
    4: (
        "the dog 's frisbee is on the grass near a well-known u.s. park",
        [
            "a dog 's frisbee lying on the grass in a u.s. park",
            "a brown dog drops its frisbee on the green grass",
            "frisbee on the grass the dog ca n't find it",
        ],
    ),
    5: (
        "a red double-decker bus on a city street in st. louis",
        [
            "a red double-decker bus drives down a city street",
            "a double decker bus on a street in st. louis mo.",
            "a red bus on the street with people waiting",
        ],
    ),
}
COCO_BLEU_1_TO_4 = [0.8805970149122299, 0.7005887279144145, 0.5226703466249356, 0.3474276486616001]
COCO_IMAGES_CIDER_D = 2.2368486857647576
COCO_IMAGES_CIDER_D_PER_IMAGE = [
    1.9136722178691121,
    1.5548935788332594,
    2.8827239833474794,
    1.8133389821704362,
    2.024091268102544,
    3.232372084265715,
]


def test_coco_style_captions_tokenise_as_pycocoevalcap():
    for image, (hypothesis, references) in enumerate(COCO_IMAGES):
        expected_hypothesis, expected_references = COCO_IMAGES_TOKENISED[image]
        assert metrics.ptb_tokenize(hypothesis) == expected_hypothesis
        assert [metrics.ptb_tokenize(r) for r in references] == expected_references


def test_bleu_and_cider_d_match_pycocoevalcap_on_raw_captions():
    hypotheses = [hypothesis for hypothesis, _ in COCO_IMAGES]
    references = [refs for _, refs in COCO_IMAGES]
    # pycocoevalcap's Bleu adds 1e-15 / 1e-9 to its counts: its values differ from the exact ones by < 1e-10.
    for max_n, expected in enumerate(COCO_BLEU_1_TO_4, 1):
        assert metrics.corpus_bleu(hypotheses, references, max_n=max_n) == pytest.approx(expected, abs=1e-9)
    assert metrics.cider_d(hypotheses, references) == pytest.approx(COCO_IMAGES_CIDER_D, abs=1e-9)
    assert metrics.cider_d_scores(hypotheses, references) == pytest.approx(COCO_IMAGES_CIDER_D_PER_IMAGE, abs=1e-9)


def test_cider_of_one_image_is_zero_and_reported_as_meaningless(tmp_path):
    assert metrics.cider_d(["a cat on a mat"], [["a cat on a mat"]]) == 0.0  # as in coco-caption
    assert metrics.cider_note(2) is None
    assert "at least 2 images" in metrics.cider_note(1)
    references = tmp_path / "references.jsonl"
    references.write_text(json.dumps({"path": "cat.png", "caption": "A cat on a mat.", "label": "cat"}) + "\n")
    record = {
        "path": str(tmp_path / "cat.png"),
        "captions": ["a cat on a mat"],
        "labels": [{"label": "cat", "prob": 1.0}],
    }
    scores = score_records([record], str(references))
    assert scores["images"] == 1 and scores["exact_match"] == 1.0
    assert scores["cider"] is None and "at least 2 images" in scores["cider_note"]


# ROUGE-L: a hand-worked example, and parity with coco-caption's Rouge on fixed sets.
ROUGE_EXTRA = [  # with HYPS/REFS and COCO_IMAGES: 20 images
    ("a cat sat on the mat", ["the cat is on the mat", "a dog"]),
    ("a dog a dog a dog", ["a dog", "dog a dog runs"]),
    ("the the the the", ["the cat", "a the"]),
    ("", ["a person riding a bike"]),  # no words: one empty word, as coco-caption
    ("...", ["?", "a dog"]),  # neither has words: a match there
    ("a plane flying in a clear blue sky over the mountains at sunset", ["a plane"]),
    ("giraffe", ["a tall giraffe standing next to a tree", "giraffes eating leaves", "a giraffe in a zoo"]),
    (
        "A woman holding an umbrella in the rain.",
        ["A woman with an umbrella walks in the rain.", "Someone holds an umbrella while it rains"],
    ),
    (
        "a kitchen with a stove and a sink",
        [
            "a stove and sink in a small kitchen",
            "sink stove kitchen",
            "a kitchen with white cabinets, a stove and a sink",
        ],
    ),
    ("zebras grazing", ["two horses running in a field"]),
]


def test_lcs_length_counts_words_in_order_not_adjacent():
    assert metrics.lcs_length("a b c b d a b".split(), "b d c a b a".split()) == 4
    assert metrics.lcs_length([], ["a"]) == 0 and metrics.lcs_length(["a", "b"], ["b", "a"]) == 1


def test_rouge_l_hand_worked_example():
    # Image 1: LCS 4 ("cat on the mat") with the first reference (P = R = 4/6), 2 ("a cat") with the second
    # (P = 2/6, R = 2/2): best P = 2/3 and best R = 1, from different references;
    # F = (1 + 1.44) (2/3) 1 / (1 + 1.44 (2/3)) = 4.88 / 5.88 = 122/147. Image 2: identical, 1. Image 3: 0.
    hypotheses = ["A cat sat on the mat.", "a dog", "a bird"]
    references = [["the cat is on the mat", "a cat"], ["A dog!"], ["the cat"]]
    assert metrics.rouge_l_scores(hypotheses, references) == pytest.approx([122 / 147, 1.0, 0.0], abs=1e-15)
    assert metrics.rouge_l(hypotheses, references) == pytest.approx((122 / 147 + 1.0) / 3, abs=1e-15)
    with pytest.raises(ValueError, match="non-empty list"):
        metrics.rouge_l(["a"], [[]])


# pycocoevalcap 1.2's Rouge().compute_score on these 20 images (2026-12-06), its words from tokenize_caption (its
# PTBTokenizer needs Java): per image and the mean. The test below also recomputes them when pycocoevalcap is installed.
COCO_ROUGE_L = 0.5790170367334005
COCO_ROUGE_L_PER_IMAGE = [
    0.7134502923976607,
    0.7587064676616916,
    0.6666666666666666,
    0.7904967602591793,
    0.42508710801393734,
    0.6,
    0.6075697211155379,
    0.5150784077201447,
    0.725231175693527,
    0.7562541509851671,
    0.6666666666666666,
    0.7093023255813954,
    0.3546511627906977,
    0.0,
    1.0,
    0.30730478589420657,
    0.2975609756097561,
    0.8148854961832059,
    0.8714285714285713,
    0.0,
]


def test_rouge_l_matches_pycocoevalcap():
    images = list(zip(HYPS, REFS)) + COCO_IMAGES + ROUGE_EXTRA
    hypotheses, references = [h for h, _ in images], [refs for _, refs in images]
    assert len(images) == 20
    assert metrics.rouge_l_scores(hypotheses, references) == pytest.approx(COCO_ROUGE_L_PER_IMAGE, abs=1e-12)
    assert metrics.rouge_l(hypotheses, references) == pytest.approx(COCO_ROUGE_L, abs=1e-12)
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    words = lambda text: " ".join(metrics.tokenize_caption(text))  # coco's PTBTokenizer needs Java: tokenised here
    gts = {n: [words(r) for r in refs] for n, refs in enumerate(references)}
    res = {n: [words(h)] for n, h in enumerate(hypotheses)}
    expected, expected_per_image = rouge.Rouge().compute_score(gts, res)
    assert metrics.rouge_l_scores(hypotheses, references) == pytest.approx(list(expected_per_image), abs=1e-9)
    assert metrics.rouge_l(hypotheses, references) == pytest.approx(float(expected), abs=1e-9)
