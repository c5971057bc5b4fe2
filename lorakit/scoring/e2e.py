"""The E2E NLG Challenge scorer (tuetschek/e2e-metrics, ``measure_scores.py -p``), offline.

Five metrics, each matching the official scorer as the LoRA paper ran it:

* BLEU and NIST: the scorer's Python mteval-v13a (``lorakit.scoring.bleu_nist``), on the raw text.
* METEOR, ROUGE-L, CIDEr: coco-caption's, on text tokenized by coco's PTBTokenizer (lowercased,
  punctuation tokens removed), which the official scorer applies in Python mode too.

The file formats are the official scorer's: a predictions file has one output per line; a references file
has the references of one input per line, with a blank line between inputs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lorakit.errors import UserError
from lorakit.lora.files import atomic_write
from lorakit.scoring.bleu_nist import corpus_bleu, corpus_nist
from lorakit.scoring.java import ptb_tokenize
from lorakit.scoring.meteor import Meteor
from lorakit.scoring.rouge_cider import corpus_cider_d, corpus_rouge_l

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def score_e2e(
    predictions: Sequence[str], references: Sequence[Sequence[str]], meteor: Meteor | None = None
) -> dict[str, float]:
    """Score ``predictions[i]`` against ``references[i]`` (one or more strings) with the five E2E metrics.

    Returns ``{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}`` on the official scorer's scales: BLEU,
    METEOR and ROUGE-L in 0–1 (the scorer prints e.g. ``BLEU: 0.6800``), NIST around 8–9 for good E2E
    systems, CIDEr around 2–3 (coco's ×10 scale). Values are unrounded floats.

    Needs Java and the ``pycocoevalcap`` package (for its jars). A METEOR process costs several seconds to
    start; pass a running ``meteor`` to reuse one across calls. Raises ValueError when the counts differ, the
    input is empty, or an output has no reference.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference groups")
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every prediction needs at least one reference")

    scorer = meteor if meteor is not None else Meteor()
    try:
        # A new METEOR JVM loads its paraphrase table while the tokenizer and the Python metrics run.
        flat_refs = [ref for refs in references for ref in refs]
        tok_preds = ptb_tokenize(list(predictions))
        tok_flat = iter(ptb_tokenize(flat_refs))
        tok_refs = [[next(tok_flat) for _ in refs] for refs in references]
        scores = {
            "BLEU": corpus_bleu(predictions, references),
            "NIST": corpus_nist(predictions, references),
            "ROUGE_L": corpus_rouge_l(tok_preds, tok_refs),
            "CIDEr": corpus_cider_d(tok_preds, tok_refs),
        }
        # Last, so that a newly started METEOR has had the longest time to load.
        scores["METEOR"] = scorer.score(tok_preds, tok_refs)[0]
    finally:
        if meteor is None:
            scorer.close()
    return {name: scores[name] for name in METRICS}


def _read_lines(path: str | os.PathLike[str]) -> list[str]:
    """Lines as the official scorer reads them: UTF-8, split at every Unicode line break, stripped."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return [line.strip() for line in text.splitlines()]


def read_predictions(path: str | os.PathLike[str]) -> list[str]:
    """Outputs from a predictions file, one per line (a blank line is an empty output)."""
    return _read_lines(path)


def read_references(path: str | os.PathLike[str]) -> list[list[str]]:
    """Reference groups from a references file: one reference per line, a blank line between groups.

    As in the official scorer, a file without any blank line separating groups is read as one reference
    per input (each line its own group). Blank lines at the end are ignored; two blank lines in a row
    elsewhere would make an input without references and raise UserError.
    """
    lines = _read_lines(path)
    while lines and not lines[-1]:
        lines.pop()
    groups: list[list[str]] = [[]]
    for number, line in enumerate(lines, start=1):
        if line:
            groups[-1].append(line)
            continue
        if not groups[-1]:
            raise UserError(
                f"empty reference group before line {number} (two blank lines in a row?)", where=str(path)
            )
        groups.append([])
    if groups == [[]]:
        return []
    if len(groups) == 1:
        return [[ref] for ref in groups[0]]
    return groups


def _write_atomically(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="\n"))


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()).strip()


def write_predictions(path: str | os.PathLike[str], predictions: Sequence[str]) -> None:
    """Write outputs one per line (line breaks inside an output become spaces), via a temporary file."""
    _write_atomically(path, "".join(_one_line(p) + "\n" for p in predictions))


def write_references(path: str | os.PathLike[str], references: Sequence[Sequence[str]]) -> None:
    """Write reference groups one reference per line, a blank line between groups, via a temporary file.

    Every group needs at least one reference and no reference may be blank (the format has no way to
    write either). The format cannot tell one group of several references from several one-reference
    groups: ``read_references`` reads a file that holds a single group as the latter, as the official
    scorer does. Any other list of groups reads back unchanged (up to surrounding whitespace).
    """
    blocks = []
    for i, refs in enumerate(references):
        lines = [_one_line(r) for r in refs]
        if not lines or not all(lines):
            raise ValueError(f"reference group {i} is empty or has a blank reference")
        blocks.append("".join(line + "\n" for line in lines))
    _write_atomically(path, "\n".join(blocks))


def score_e2e_files(
    predictions_path: str | os.PathLike[str],
    references_path: str | os.PathLike[str],
    meteor: Meteor | None = None,
) -> dict[str, float]:
    """``score_e2e`` on a predictions file and a references file in the official formats.

    Raises UserError, naming both files, when their counts differ or both are empty.
    """
    predictions = read_predictions(predictions_path)
    references = read_references(references_path)
    if len(predictions) != len(references):
        raise UserError(
            f"{predictions_path} has {len(predictions)} predictions but {references_path} has "
            f"{len(references)} reference groups; they must match one to one"
        )
    if not predictions:
        raise UserError(f"{predictions_path} and {references_path} are empty: nothing to score")
    return score_e2e(predictions, references, meteor=meteor)
