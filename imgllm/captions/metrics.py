"""Caption metrics: corpus BLEU-4, CIDEr-D and exact match.

Implemented here (pure Python, no Java) and checked in tests/test_metrics.py against the published values of
NLTK's `corpus_bleu` docstring and against the coco-caption reference implementation of CIDEr-D
(pycocoevalcap `Cider`) on fixed examples.

All metrics take hypotheses as a sequence of strings and references as a sequence (one entry per hypothesis)
of non-empty sequences of strings. Strings are tokenised by `tokenize_caption` unless already lists of words.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Sequence

Text = str | Sequence[str]

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_caption(text: Text) -> list[str]:
    """Lower-cases `text` and splits it into words, dropping punctuation (as coco-caption's PTB step does).

    A list/tuple of words is returned unchanged, so callers may tokenise themselves.
    """
    if isinstance(text, str):
        return _WORD.findall(text.lower())
    return list(text)


def _ngram_counts(words: Sequence[str], max_n: int) -> collections.Counter:
    """Counts every n-gram of `words` for n = 1..max_n (keys are tuples)."""
    counts = collections.Counter()
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i:i + n])] += 1
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
    NLTK's `corpus_bleu` default. Returns 0.0 when some n-gram order has no match.
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


def cider_d_scores(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]], *, max_n: int = 4,
                   sigma: float = 6.0) -> list[float]:
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
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in hyp_vec[n].items())
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    dot /= hyp_norm[n] * ref_norm[n]
                total += dot * penalty
        scores.append(10.0 * total / (max_n * len(refs)))
    return scores


def cider_d(hypotheses: Sequence[Text], references: Sequence[Sequence[Text]]) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_scores`."""
    scores = cider_d_scores(hypotheses, references)
    return sum(scores) / len(scores)


def normalize_caption(text: str) -> str:
    """The caption's words joined by single spaces (case, punctuation and spacing ignored)."""
    return " ".join(tokenize_caption(text))


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Fraction of hypotheses equal to one of their references after `normalize_caption`."""
    _check_pairs(hypotheses, references)
    hits = sum(normalize_caption(h) in {normalize_caption(r) for r in refs}
               for h, refs in zip(hypotheses, references))
    return hits / len(hypotheses)


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"bleu4", "cider", "exact_match"} for a corpus of generated captions and their references."""
    return {"bleu4": bleu4(hypotheses, references), "cider": cider_d(hypotheses, references),
            "exact_match": exact_match(hypotheses, references)}
