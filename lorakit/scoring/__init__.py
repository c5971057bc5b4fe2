"""Offline scorers for generation tasks; ``lorakit.scoring.e2e`` reproduces the E2E NLG Challenge scorer."""

from __future__ import annotations

from lorakit.scoring.e2e import (
    METRICS,
    read_predictions,
    read_references,
    score_e2e,
    score_e2e_files,
    write_predictions,
    write_references,
)

__all__ = [
    "METRICS",
    "read_predictions",
    "read_references",
    "score_e2e",
    "score_e2e_files",
    "write_predictions",
    "write_references",
]
