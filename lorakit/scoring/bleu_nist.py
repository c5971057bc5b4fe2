"""Corpus BLEU-4 and NIST-5 as the E2E NLG scorer computes them in its Python mode (``measure_scores.py -p``).

The official scorer (tuetschek/e2e-metrics, ``metrics/pymteval.py``) mimics mteval-v13a: 13a tokenization,
case-insensitive matching, multiple references per segment. This module implements the same definitions,
including the corner cases where that implementation differs from textbook BLEU (see ``corpus_bleu``), so
that scores agree with the official numbers to every printed digit.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

Ngram = tuple[str, ...]

_TOKENIZER_13A = Tokenizer13a()

# The official scorer floors a zero hit count and a zero (or negative) candidate count so that the
# logarithm stays defined; a corpus with no 4-gram hit thus scores a tiny positive BLEU, not 0.
_BLEU_TINY_HITS = 1e-15
_BLEU_SMALL_LENGTH = 1e-9

# mteval-v13a's NIST brevity penalty exp(-beta * ln(ratio)^2), with beta chosen so that the penalty is
# exactly 0.5 when the output is 2/3 of the reference length.
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def tokenize_13a(text: str) -> list[str]:
    """Split ``text`` into lowercased mteval-v13a tokens.

    An empty or blank string yields ``[""]``, one empty token, exactly as the official scorer does: it
    counts as a one-token output in every length and n-gram total.
    """
    return [token.lower() for token in _TOKENIZER_13A(text).split(" ")]


def _ngrams(tokens: Sequence[str], n: int) -> Counter[Ngram]:
    return Counter(zip(*(tokens[i:] for i in range(n)), strict=False))


def _max_ref_counts(refs: Sequence[Sequence[str]], n: int) -> Counter[Ngram]:
    """For each n-gram, the highest count it has in any one reference (the BLEU clipping ceiling)."""
    merged: Counter[Ngram] = Counter()
    for ref in refs:
        merged |= _ngrams(ref, n)
    return merged


def _clipped_hits(hyp_counts: Counter[Ngram], ceiling: Counter[Ngram]) -> Counter[Ngram]:
    return Counter({g: min(c, ceiling[g]) for g, c in hyp_counts.items() if ceiling[g] > 0})


def _check_lengths(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs but {len(references)} reference groups")
    if not hypotheses:
        raise ValueError("nothing to score: no outputs")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"segment {i} has no reference")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU on the 0–1 scale, case-insensitive, with 13a tokenization.

    ``references[i]`` holds every reference for ``hypotheses[i]``. Clipping uses the highest count of each
    n-gram in any single reference; the effective reference length of a segment is the length of its
    reference closest to the output (the shorter one on a tie).

    On ordinary corpora this equals ``sacrebleu.corpus_bleu(..., lowercase=True).score / 100``. It differs, as
    the official scorer does, in three corner cases: an empty output is one (empty) token, not zero; an
    output shorter than n - 1 tokens adds ``len - n + 1`` (a negative number) to the n-gram total instead of
    0; and an order with no hit is floored to 1e-15 hits rather than smoothed or zeroed.
    """
    _check_lengths(hypotheses, references)
    hits = [0] * max_n
    totals = [0] * max_n
    ref_len = 0
    for hyp_text, ref_texts in zip(hypotheses, references, strict=True):
        hyp = tokenize_13a(hyp_text)
        refs = [tokenize_13a(r) for r in ref_texts]
        for n in range(1, max_n + 1):
            hyp_counts = _ngrams(hyp, n)
            hits[n - 1] += sum(_clipped_hits(hyp_counts, _max_ref_counts(refs, n)).values())
            # Deliberately not max(0, ...): the official totals go negative for very short outputs.
            totals[n - 1] += len(hyp) - n + 1
        closest = min(refs, key=lambda r: (abs(len(r) - len(hyp)), len(r)))
        ref_len += len(closest)

    sys_len = totals[0]
    brevity = 1.0
    if sys_len <= ref_len:
        brevity = math.exp(1.0 - ref_len / (sys_len if sys_len else 1e-5))
    log_precision = 0.0
    for n_hits, n_total in zip(hits, totals, strict=True):
        log_precision += math.log(max(n_hits, _BLEU_TINY_HITS) / max(n_total, _BLEU_SMALL_LENGTH))
    return brevity * math.exp(log_precision / max_n)


def nist_length_penalty(sys_len: float, avg_ref_len: float) -> float:
    """NIST's brevity factor for total output length ``sys_len`` against the summed mean reference length."""
    ratio = sys_len / avg_ref_len
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


def corpus_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5) -> float:
    """Corpus NIST (mteval-v13a definition, n = ``max_n``), case-insensitive, with 13a tokenization.

    Information weights come from every reference of the evaluated set: ``info(w1..wn) =
    log2(count(w1..wn-1) / count(w1..wn))``, where counts are over all reference n-grams (not clipped) and
    the count of the empty prefix is the total number of reference tokens. Each order contributes the
    information of its clipped hits divided by the number of output n-grams of that order; the sum is
    scaled by the brevity penalty of the total output length against the sum over segments of the mean
    reference length.

    The same corner cases as ``corpus_bleu`` apply to output lengths. An order whose output n-gram total is
    exactly 0 (where the official scorer divides by zero) contributes 0.
    """
    _check_lengths(hypotheses, references)
    ref_counts: Counter[Ngram] = Counter()
    hit_counts: list[list[Counter[Ngram]]] = [[] for _ in range(max_n)]
    totals = [0] * max_n
    avg_ref_len = 0.0
    for hyp_text, ref_texts in zip(hypotheses, references, strict=True):
        hyp = tokenize_13a(hyp_text)
        refs = [tokenize_13a(r) for r in ref_texts]
        for n in range(1, max_n + 1):
            totals[n - 1] += len(hyp) - n + 1
            hit_counts[n - 1].append(_clipped_hits(_ngrams(hyp, n), _max_ref_counts(refs, n)))
            for ref in refs:
                ref_counts.update(_ngrams(ref, n))
        ref_token_total = sum(len(r) for r in refs)
        ref_counts[()] += ref_token_total
        avg_ref_len += ref_token_total / len(refs)

    def info(ngram: Ngram) -> float:
        # Every hit n-gram occurs in some reference, so both counts are positive.
        return math.log2(ref_counts[ngram[:-1]] / ref_counts[ngram])

    score = 0.0
    for n in range(max_n):
        if totals[n] == 0:
            continue
        order_info = sum(info(g) * c for seg_hits in hit_counts[n] for g, c in seg_hits.items())
        score += order_info / totals[n]
    return score * nist_length_penalty(totals[0], avg_ref_len)
