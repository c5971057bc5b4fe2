"""ROUGE-L and CIDEr-D as coco-caption computes them for the E2E scorer.

Both take texts already tokenized the coco way (``lorakit.scoring.java.ptb_tokenize``): lowercased tokens
joined by single spaces.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

ROUGE_BETA = 1.2
CIDER_MAX_N = 4
CIDER_SIGMA = 6.0

Ngram = tuple[str, ...]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel (Hyyrö 2004): bit i of ``row`` is 1 while position i of ``a`` is still unmatched, so each
    token of ``b`` costs a few big-integer operations instead of a row of the quadratic table.
    """
    if len(a) < len(b):
        a, b = b, a
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    mask = (1 << len(a)) - 1
    row = mask
    for token in b:
        matches = row & positions.get(token, 0)
        row = ((row + matches) | (row - matches)) & mask
    return len(a) - row.bit_count()


def rouge_l_segment(hypothesis: str, references: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """coco ROUGE-L F-score of one output: LCS precision and recall, each maxed over the references.

    Tokens are split on single spaces as coco-caption does, so an empty text is one empty token.
    """
    hyp = hypothesis.split(" ")
    precision = recall = 0.0
    for reference in references:
        ref = reference.split(" ")
        lcs = lcs_length(ref, hyp)
        precision = max(precision, lcs / len(hyp))
        recall = max(recall, lcs / len(ref))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def corpus_rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over segments of ``rouge_l_segment``."""
    scores = [rouge_l_segment(h, r) for h, r in zip(hypotheses, references, strict=True)]
    return sum(scores) / len(scores)


def _cider_counts(text: str, max_n: int) -> Counter[Ngram]:
    words = text.split()
    counts: Counter[Ngram] = Counter()
    for n in range(1, max_n + 1):
        counts.update(zip(*(words[i:] for i in range(n)), strict=False))
    return counts


class _TfIdf:
    """A text's tf-idf vector split by n-gram order, with per-order norms and coco's "length"."""

    def __init__(self, counts: Counter[Ngram], doc_freq: Counter[Ngram], log_docs: float, max_n: int) -> None:
        self.vec: list[dict[Ngram, float]] = [{} for _ in range(max_n)]
        squares = [0.0] * max_n
        for ngram, tf in counts.items():
            weight = tf * (log_docs - math.log(max(1.0, doc_freq[ngram])))
            self.vec[len(ngram) - 1][ngram] = weight
            squares[len(ngram) - 1] += weight * weight
        self.norm = [math.sqrt(s) for s in squares]
        # coco-caption's length is the number of bigrams, not of words; it only matters for empty texts.
        self.length = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)


def _cider_similarity(hyp: _TfIdf, ref: _TfIdf, sigma: float) -> float:
    """Sum over orders of the clipped cosine similarity, each damped by the Gaussian length penalty."""
    penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * sigma**2))
    total = 0.0
    for h_vec, r_vec, h_norm, r_norm in zip(hyp.vec, ref.vec, hyp.norm, ref.norm, strict=True):
        # CIDEr-D clips the hypothesis weight at the reference weight before the dot product.
        dot = sum(min(w, r_vec.get(g, 0.0)) * r_vec.get(g, 0.0) for g, w in h_vec.items())
        if h_norm != 0 and r_norm != 0:
            dot /= h_norm * r_norm
        total += dot * penalty
    return total


def cider_d_segments(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    max_n: int = CIDER_MAX_N,
    sigma: float = CIDER_SIGMA,
) -> list[float]:
    """coco CIDEr-D of every output, with document frequencies taken from this set's references.

    An n-gram's document frequency is the number of segments whose references contain it; its idf is
    ``log(segments) - log(max(1, df))``. Each segment scores the mean over orders 1..``max_n`` of the
    clipped, length-penalised cosine similarity, averaged over its references, times 10.
    """
    ref_counts = [[_cider_counts(r, max_n) for r in refs] for refs in references]
    doc_freq: Counter[Ngram] = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    log_docs = math.log(len(references))
    scores = []
    for hyp_text, refs in zip(hypotheses, ref_counts, strict=True):
        hyp = _TfIdf(_cider_counts(hyp_text, max_n), doc_freq, log_docs, max_n)
        total = sum(_cider_similarity(hyp, _TfIdf(ref, doc_freq, log_docs, max_n), sigma) for ref in refs)
        scores.append(total / max_n / len(refs) * 10.0)
    return scores


def corpus_cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over segments of ``cider_d_segments``, the CIDEr figure the E2E scorer reports."""
    scores = cider_d_segments(hypotheses, references)
    return sum(scores) / len(scores)
