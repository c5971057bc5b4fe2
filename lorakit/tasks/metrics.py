"""Metrics shared by task families, in percent where GLUE and the paper report percent: accuracy, F1, MCC and
correlations for classes and scores, micro/macro F1 and exact match for multilabel rows."""

from __future__ import annotations

import math
import warnings

import numpy as np


def mcc(preds: np.ndarray, refs: np.ndarray) -> float:
    """Matthews correlation in percent; 0 where it is undefined (one class only, or no rows)."""
    if len(refs) == 0:
        return 0.0
    with warnings.catch_warnings():
        # sklearn warns when only one class occurs; MCC is then undefined and it returns 0, as we want.
        warnings.simplefilter("ignore")
        from sklearn.metrics import matthews_corrcoef

        return 100.0 * float(matthews_corrcoef(refs, preds))


def correlation(name: str, preds: np.ndarray, refs: np.ndarray) -> float:
    """``pearsonr`` or ``spearmanr`` in percent; 0 where it is undefined."""
    # A correlation is undefined for fewer than two points or a constant input (scipy gives nan and a
    # warning). Report 0.0 then: an early, collapsed regressor should score as "no correlation", and a
    # nan would break best-checkpoint comparisons.
    if len(refs) < 2:
        return 0.0
    import scipy.stats

    fn = getattr(scipy.stats, name)  # pearsonr or spearmanr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(preds.astype(np.float64), refs.astype(np.float64))[0])
    return 0.0 if math.isnan(value) else 100.0 * value


def classification_metrics(preds: np.ndarray, refs: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 (over the classes that occur in labels or predictions) and MCC, in percent."""
    from sklearn.metrics import f1_score

    if len(refs) == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "mcc": 0.0}
    return {
        "accuracy": 100.0 * float(np.mean(preds == refs)),
        "macro_f1": 100.0 * float(f1_score(refs, preds, average="macro", zero_division=0.0)),
        "mcc": mcc(preds, refs),
    }


def regression_metrics(preds: np.ndarray, refs: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman in percent, and the mean squared error in the labels' own units."""
    mse = float(np.mean((preds.astype(np.float64) - refs.astype(np.float64)) ** 2)) if len(refs) else 0.0
    return {
        "pearson": correlation("pearsonr", preds, refs),
        "spearman": correlation("spearmanr", preds, refs),
        "mse": mse,
    }


def multilabel_metrics(preds: np.ndarray, refs: np.ndarray) -> dict[str, float]:
    """Micro-F1, macro-F1 (over every label) and exact match (all of a row's labels right), in percent,
    from multi-hot ``(rows, labels)`` arrays."""
    from sklearn.metrics import f1_score

    if len(refs) == 0:
        return {"micro_f1": 0.0, "macro_f1": 0.0, "exact_match": 0.0}
    preds, refs = preds.astype(np.int64), refs.astype(np.int64)
    return {
        "micro_f1": 100.0 * float(f1_score(refs, preds, average="micro", zero_division=0.0)),
        "macro_f1": 100.0 * float(f1_score(refs, preds, average="macro", zero_division=0.0)),
        "exact_match": 100.0 * float(np.mean(np.all(preds == refs, axis=1))),
    }


# Metrics where less is better; every other metric is better higher.
LOWER_IS_BETTER = frozenset({"eval_loss", "perplexity", "mse"})
