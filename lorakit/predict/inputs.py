"""Rows to predict: one JSON object a line, ``{"adapter": NAME, "text": "...", "text_pair": "..."}``.

Every row is checked before any model is loaded: a line that is not a JSON object, an adapter the run
does not serve, a missing or non-string ``text``: a UserError naming ``FILE:LINE``, and nothing runs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import UserError


@dataclass(frozen=True)
class Row:
    """One input row: the adapter it asks for, its text (and second text for pair tasks), its origin."""

    adapter: str
    text: str
    text_pair: str | None = None
    where: str = "<input>"


def parse_row(record: object, adapters: Collection[str], where: str) -> Row:
    """A row from a decoded JSON value; UserError naming ``where`` when it is not a valid row."""
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object, got {type(record).__name__}", where=where)
    name = record.get("adapter")
    if not isinstance(name, str) or name not in adapters:
        known = ", ".join(sorted(adapters))
        raise UserError(f"unknown adapter {name!r} (served: {known})", where=where)
    text, pair = record.get("text"), record.get("text_pair")
    if not isinstance(text, str) or not text:
        raise UserError("missing 'text' (a non-empty string)", where=where)
    if pair is not None and not isinstance(pair, str):
        raise UserError("'text_pair' must be a string", where=where)
    extra = sorted(set(record) - {"adapter", "text", "text_pair"})
    if extra:
        raise UserError(f"unknown keys {extra} (expected adapter, text, text_pair)", where=where)
    return Row(name, text, pair, where)


def read_rows(spec: str, adapters: Collection[str]) -> list[Row]:
    """The rows of a JSONL file (``-``: standard input); blank lines are skipped."""
    if spec == "-":
        text, origin = sys.stdin.read(), "<stdin>"
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError("input file not found", where=spec)
        try:
            text, origin = path.read_bytes().decode("utf-8-sig"), spec
        except OSError as exc:
            raise UserError(f"cannot read the input file: {exc.strerror or exc}", where=spec) from None
        except UnicodeDecodeError as exc:
            raise UserError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", where=spec) from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{origin}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"not JSON: {exc.msg} (column {exc.colno})", where=where) from None
        rows.append(parse_row(record, adapters, where))
    if not rows:
        raise UserError("no rows (every line is blank)", where=origin)
    return rows
