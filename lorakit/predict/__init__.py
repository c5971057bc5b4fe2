"""``lorakit predict``: many adapters on one base model, rows in, mixed-task batches, rows out.

``sources``: what each ``--adapter NAME=DIR`` serves, and the one-base check; ``inputs``: the JSONL rows;
``runner``: the ``Predictor`` (one base, many adapters) that ``lorakit serve`` reuses; ``merged``: one merged
base copy per adapter, the way to serve many tasks without a shared base (``lorakit serve --merged``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lorakit.errors import UserError
from lorakit.predict.inputs import Row, parse_row, read_rows
from lorakit.predict.merged import MergedPredictor
from lorakit.predict.runner import Output, Predictor, check_prompts
from lorakit.predict.sources import AdapterSource, check_one_base, read_source

__all__ = [
    "AdapterSource",
    "MergedPredictor",
    "Output",
    "Predictor",
    "Row",
    "check_one_base",
    "check_prompts",
    "parse_row",
    "predict_file",
    "read_rows",
    "read_source",
    "read_sources",
]


def read_sources(specs: Sequence[str], base: str | None, max_length: int | None) -> dict[str, AdapterSource]:
    """Every ``--adapter NAME=DIR``, by name; UserError for a repeated name."""
    sources: dict[str, AdapterSource] = {}
    for spec in specs:
        source = read_source(spec, base, max_length)
        if source.name in sources:
            raise UserError(f"adapter name {source.name!r} is given twice", where=source.where)
        sources[source.name] = source
    return sources


def predict_file(
    specs: Sequence[str],
    input_spec: str,
    output: Path | None = None,
    batch_size: int = 64,
    base: str | None = None,
    max_length: int | None = None,
) -> int:
    """Predict every row of ``input_spec`` (a JSONL file, ``-`` for standard input) with the adapters
    ``specs``; writes one JSON line per row, in input order, to ``output`` (written aside and renamed:
    nothing half-written) or standard output. Returns the number of rows. Every adapter, the one-base
    check and every row are checked before the model loads."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lorakit.runs import atomic_write_text

    if not specs:
        raise UserError("name at least one adapter", where="--adapter")
    sources = read_sources(specs, base, max_length)
    check_one_base(list(sources.values()), base)
    rows = read_rows(input_spec, sources)
    check_prompts(sources, rows)
    predictor = Predictor(list(sources.values()), base)
    columns = (TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # On stderr, and only for long inputs: standard output may be the results themselves.
    with Progress(*columns, console=Console(stderr=True), disable=len(rows) < 4 * batch_size) as bar:
        task = bar.add_task("predict", total=len(rows))
        outputs = predictor.predict(rows, batch_size, lambda n: bar.advance(task, n))
    text = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)
    return len(rows)
