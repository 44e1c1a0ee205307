"""Caption metrics: corpus BLEU, CIDEr-D, ROUGE-L and exact match, on coco-caption's tokenisation; distinct-n and
class read-back, which need no reference.

Implemented here (pure Python, no Java) and checked in tests/test_metrics.py against the published values of
NLTK's `corpus_bleu` docstring and against coco-caption's reference implementation (pycocoevalcap: its
PTBTokenizer, `Bleu` and `Cider`) on fixed examples.

All metrics take hypotheses as a sequence of strings and references as a sequence (one entry per hypothesis)
of non-empty sequences of strings. Strings are tokenised by `tokenize_caption` unless already lists of words:
coco-caption's PTB tokenisation, ported to Python in `imgllm.captions.ptb` (`ptb_tokenize` and `tokenize_caption`
are importable from here too).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

from imgllm.captions.ptb import Text, ptb_tokenize, ptb_tokens, tokenize_caption

__all__ = [
    "bleu4",
    "caption_metrics",
    "cider_d",
    "cider_d_scores",
    "cider_note",
    "classes_named",
    "corpus_bleu",
    "distinct_n",
    "exact_match",
    "lcs_length",
    "normalize_caption",
    "ptb_tokenize",
    "ptb_tokens",
    "read_back",
    "rouge_l",
    "rouge_l_scores",
    "tokenize_caption",
]


def _ngram_counts(words: Sequence[str], max_n: int) -> collections.Counter:
    """Counts every n-gram of `words` for n = 1..max_n (keys are tuples)."""
    counts = collections.Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i : i + n])] += 1
    return counts


def _check_pairs(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]]) -> None:
    """Raises a clear error when hypotheses and references do not pair up one-to-one."""
    if isinstance(hypotheses, str):
        raise TypeError("hypotheses must be a sequence of captions, got a single string")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")


def corpus_bleu(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]], max_n: int = 4) -> float:
    """Corpus-level BLEU (Papineni et al. 2002) with uniform weights over 1..max_n-grams, no smoothing.

    Clipped n-gram matches and candidate n-gram totals are summed over the corpus before the geometric mean;
    the brevity penalty uses, per hypothesis, the reference length closest to it (shorter on ties). This is
    NLTK's `corpus_bleu` default, and coco-caption's `Bleu` up to the 1e-15 and 1e-9 that it adds to its counts
    (a relative difference of 1e-9 at most; it gives a tiny positive score where this one is 0.0). Returns 0.0
    when some n-gram order has no match.
    """
    _check_pairs(hypotheses, references)
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_length = ref_length = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_words = tokenize_caption(hyp)
        ref_words = [tokenize_caption(r) for r in refs]
        hyp_counts = _ngram_counts(hyp_words, max_n)
        max_ref_counts = collections.Counter()
        for words in ref_words:
            max_ref_counts |= _ngram_counts(words, max_n)
        for ngram, count in hyp_counts.items():
            matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
        for n in range(1, max_n + 1):
            totals[n - 1] += max(len(hyp_words) - n + 1, 0)
        hyp_length += len(hyp_words)
        ref_length += min((len(w) for w in ref_words), key=lambda r: (abs(r - len(hyp_words)), r))
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_length > ref_length else math.exp(1.0 - ref_length / max(hyp_length, 1))
    return brevity * math.exp(log_precision)


def bleu4(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]]) -> float:
    """Corpus BLEU-4 (see `corpus_bleu`)."""
    return corpus_bleu(hypotheses, references, max_n=4)


def cider_d_scores(
    hypotheses: Sequence[Text], references: Sequence[Sequence[Text]], *, max_n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-hypothesis CIDEr-D (Vedantam et al. 2015, as in the coco-caption code).

    TF-IDF vectors of 1..max_n-grams, with document frequencies counted over the reference sets of this corpus
    (one document per image); for each reference, the cosine similarity with the hypothesis' counts clipped to
    the reference's, times a Gaussian penalty exp(-(len_h - len_r)^2 / (2 sigma^2)); averaged over n and over
    references, times 10.
    """
    _check_pairs(hypotheses, references)
    hyp_counts = [_ngram_counts(tokenize_caption(h), max_n) for h in hypotheses]
    ref_counts = [[_ngram_counts(tokenize_caption(r), max_n) for r in refs] for refs in references]
    document_frequency = collections.Counter()
    for refs in ref_counts:
        document_frequency.update({ngram for counts in refs for ngram in counts})
    log_num_documents = math.log(len(references))

    def tfidf(counts):
        vectors = [dict() for _ in range(max_n)]
        for ngram, tf in counts.items():
            vectors[len(ngram) - 1][ngram] = tf * (log_num_documents - math.log(max(1.0, document_frequency[ngram])))
        norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
        length = sum(tf for ngram, tf in counts.items() if len(ngram) == 1)
        return vectors, norms, length

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        hyp_vec, hyp_norm, hyp_len = tfidf(hyp)
        total = 0.0
        for ref in refs:
            ref_vec, ref_norm, ref_len = tfidf(ref)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in hyp_vec[n].items())
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    dot /= hyp_norm[n] * ref_norm[n]
                total += dot * penalty
        scores.append(10.0 * total / (max_n * len(refs)))
    return scores


def cider_d(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]]) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_scores`. 0 for a single image, as in coco-caption (`cider_note`)."""
    scores = cider_d_scores(hypotheses, references)
    return sum(scores) / len(scores)


def cider_note(num_images: int) -> str | None:
    """Why CIDEr-D means nothing for `num_images` images (fewer than two), else None: its n-gram weights are
    document frequencies over the images scored together, and with one image every weight is log(1/1) = 0."""
    if num_images >= 2:
        return None
    return (
        f"CIDEr-D needs at least 2 images (got {num_images}): its n-gram weights come from the images scored "
        "together, and for one image they are all 0"
    )


def normalize_caption(text: str) -> str:
    """The caption's words joined by single spaces (case, punctuation and spacing ignored, as `tokenize_caption`)."""
    return " ".join(tokenize_caption(text))


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of hypotheses equal to one of their references after `normalize_caption`."""
    _check_pairs(hypotheses, references)
    hits = sum(normalize_caption(h) in {normalize_caption(r) for r in refs} for h, refs in zip(hypotheses, references))
    return hits / len(hypotheses)


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu4", "cider", "rouge_l", "exact_match"} for a corpus of generated captions and their references.

    "cider" is 0.0 for a single image, a number without meaning: reports should say so (`cider_note`).
    """
    return {
        "bleu4": bleu4(hypotheses, references),
        "cider": cider_d(hypotheses, references),
        "rouge_l": rouge_l(hypotheses, references),
        "exact_match": exact_match(hypotheses, references),
    }


# ------------------------------------------------------------------------ without references: diversity, read-back


def distinct_n(captions: Sequence[Text], n: int) -> float:
    """distinct-n (Li et al. 2016): distinct n-grams over all n-grams of a corpus of captions (1.0: no n-gram
    repeats; a captioner writing one sentence for every image tends to 0). 0.0 when no caption has n words."""
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1, got {n}")
    grams = [tuple(words[i : i + n]) for words in map(tokenize_caption, captions) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def classes_named(caption: Text, names: Sequence[Sequence[str]]) -> list[int]:
    """Indices of the classes a caption names: class i is named when one of names[i] (each one or more words, e.g.
    ("automobile", "car"), "fire truck") occurs in it as whole words, case and punctuation ignored."""
    words = f" {' '.join(tokenize_caption(caption))} "
    return [
        i
        for i, synonyms in enumerate(names)
        if any(f" {' '.join(tokenize_caption(name))} " in words for name in synonyms)
    ]


def read_back(captions: Sequence[Text], predicted: Sequence[int], names: Sequence[Sequence[str]]) -> dict[str, float]:
    """How often each caption names its image's predicted class: {"names_predicted": the fraction naming it,
    "names_other": naming another class (it may name both), "names_none": naming no class}."""
    if len(captions) != len(predicted) or not len(captions):
        raise ValueError(
            f"read-back needs one predicted class per caption, got {len(captions)} captions and "
            f"{len(predicted)} classes"
        )
    named = [classes_named(caption, names) for caption in captions]
    count = len(captions)
    return {
        "names_predicted": sum(int(p) in n for n, p in zip(named, predicted)) / count,
        "names_other": sum(any(i != int(p) for i in n) for n, p in zip(named, predicted)) / count,
        "names_none": sum(not n for n in named) / count,
    }


# ---------------------------------------------------------------------------------------------------- ROUGE-L

ROUGE_L_BETA = 1.2  # coco-caption's weight of recall against precision in ROUGE-L's F-measure


def lcs_length(first: Sequence[str], second: Sequence[str]) -> int:
    """The length of the longest common subsequence of two word sequences (in order, not necessarily adjacent)."""
    previous = [0] * (len(second) + 1)
    for word in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_scores(
    hypotheses: Sequence[Text], references: Sequence[Sequence[Text]], *, beta: float = ROUGE_L_BETA
) -> list[float]:
    """Per-hypothesis ROUGE-L (Lin 2004) as coco-caption's `Rouge` computes it.

    For each reference, precision = LCS / hypothesis length and recall = LCS / reference length (`lcs_length` of
    the words); the best precision and the best recall over the references (possibly of different references)
    give F = (1 + beta^2) P R / (R + beta^2 P), 0 when either is 0. A caption without words counts as one empty
    word, as coco-caption's split(" ") of an empty string does. Words are `tokenize_caption`'s, split at any white
    space; coco-caption's Rouge splits at spaces only, so a PTB token holding a no-break space ("5 1/2") is one
    word there and two here (BLEU and CIDEr-D split as here).
    """
    _check_pairs(hypotheses, references)
    scores = []
    for hyp, refs in zip(hypotheses, references):
        hyp_words = tokenize_caption(hyp) or [""]
        precision = recall = 0.0
        for ref in refs:
            ref_words = tokenize_caption(ref) or [""]
            common = lcs_length(ref_words, hyp_words)
            precision, recall = max(precision, common / len(hyp_words)), max(recall, common / len(ref_words))
        if precision == 0 or recall == 0:
            scores.append(0.0)
        else:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return scores


def rouge_l(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]]) -> float:
    """Corpus ROUGE-L: the mean of `rouge_l_scores` over the images, as coco-caption reports it."""
    scores = rouge_l_scores(hypotheses, references)
    return sum(scores) / len(scores)
