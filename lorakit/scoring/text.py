"""Text metrics of generated outputs against one reference each: exact match, BLEU and ROUGE-L.

For a user's own generation data, where no official scorer exists (the E2E task has its own in
``lorakit.scoring.e2e``).
"""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.scoring.rouge_cider import lcs_length


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``exact_match``, ``bleu`` and ``rouge_l`` of ``predictions`` against one reference per row, each 0-100.

    - ``exact_match``: percent of predictions equal to their reference once surrounding whitespace is
      stripped.
    - ``bleu``: sacrebleu's corpus BLEU with its default settings (the ``13a`` tokenizer, mixed case,
      exponential smoothing), one reference per row.
    - ``rouge_l``: mean over rows of ROUGE-L F1 (beta = 1) of the longest common subsequence's precision and
      recall over lowercased whitespace tokens, in percent; a row whose prediction or reference has no
      token scores 0, as Google's ``rouge_score`` does.

    Empty inputs give zeros; inputs of different lengths raise ``ValueError``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return {"exact_match": 0.0, "bleu": 0.0, "rouge_l": 0.0}
    import sacrebleu  # slow to import; only scoring needs it

    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    rouge = sum(rouge_l_f1(p, r) for p, r in zip(predictions, references, strict=True))
    n = len(predictions)
    return {"exact_match": 100.0 * exact / n, "bleu": float(bleu), "rouge_l": 100.0 * rouge / n}


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (0-1) of one prediction: LCS over lowercased whitespace tokens, 0 when either is empty."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
