"""WikiSQL queries as text, and the two WikiSQL measures: logical-form match and execution.

A WikiSQL query is a dict ``{"sel": int, "agg": int, "conds": [[col, op, value], ...]}`` over a table's
header (Zhong et al., 2017). Its text form, which the model learns to write::

    SELECT {column} FROM table
    SELECT {AGG}({column}) FROM table WHERE {column} {op} {value} AND {column} {op} {value}

Columns are written as the header names them, unquoted; ``AGG`` is one of MAX MIN COUNT SUM AVG and ``op``
one of ``= > < OP`` (WikiSQL's operator lists). String values are double-quoted, a ``"`` inside doubled
(``Don "Dino" Lee`` is written ``"Don ""Dino"" Lee"``); int and float values are bare (``2003``,
``1939.0``), so a query's value types survive the round trip. Because column names may hold spaces,
brackets and even the words AND and WHERE, ``text_to_sql`` reads names by matching the header's own names
(case-insensitively, longest first) and backtracks when a reading leads nowhere; quoted values are read
to their closing quote, so values may hold `` AND `` too. Two texts stay ambiguous, and are read so: a
header that names two columns alike (WikiSQL has such tables) gives the first of them, and a column named
like an aggregate of another (``MAX(x)`` beside ``x``) gives that plain column.

Execution follows WikiSQL's ``lib/dbengine.py``: ``SELECT AGG(colN) AS result FROM table_<id> WHERE colI op
?``, string values lowercased (WikiSQL's ``.db`` files store text cells lowercased), a non-numeric value for
a ``real`` column read as a number (digit-group commas dropped, else its first number), values bound as
parameters. One difference: WikiSQL names a parameter after its column, so two conditions on one column
share the last value; here each condition has its own.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

AGG_OPS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")
COND_OPS = ("=", ">", "<", "OP")

_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_INT = re.compile(r"[-+]?\d+")
_FIRST_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")  # dbengine's fallback for values like "5 km"


def sql_to_text(sql: Mapping[str, Any], header: Sequence[str]) -> str:
    """The text form of ``sql`` over ``header`` (module docstring). Raises IndexError for an index
    outside the header or the operator lists."""
    column = header[sql["sel"]]
    agg = AGG_OPS[_index(sql["agg"], AGG_OPS)]
    text = f"SELECT {agg}({column}) FROM table" if agg else f"SELECT {column} FROM table"
    conds = [
        f"{header[col]} {COND_OPS[_index(op, COND_OPS)]} {_format_value(value)}"
        for col, op, value in sql["conds"]
    ]
    if conds:
        text += " WHERE " + " AND ".join(conds)
    return text


def text_to_sql(text: str, header: Sequence[str]) -> dict[str, Any] | None:
    """The query that ``text`` writes over ``header``, or None when it cannot be read; never raises.

    Only the first line counts (generation may run on past the query), and surrounding whitespace is
    ignored. Keywords and column names match case-insensitively. A bare value must be a number: a bare
    word could swallow a truncated `` AND`` and read as a query the model never finished.
    """
    try:
        return _Parser(text, header).parse()
    except (TypeError, ValueError, IndexError, AttributeError, RecursionError):
        return None


def logical_form_match(pred: Mapping[str, Any] | None, gold: Mapping[str, Any]) -> bool:
    """WikiSQL's query equality: same ``sel`` and ``agg``, and the same set of conditions, values
    compared as lowercased ``str()`` (so ``3`` equals ``"3"``, but ``3.0`` does not)."""
    if pred is None:
        return False
    return (
        pred["sel"] == gold["sel"]
        and pred["agg"] == gold["agg"]
        and _cond_set(pred["conds"]) == _cond_set(gold["conds"])
    )


def table_name(table_id: str) -> str:
    """The SQLite table holding WikiSQL table ``table_id`` (``1-10015132-11`` -> ``table_1_10015132_11``)."""
    return table_id if table_id.startswith("table") else "table_" + table_id.replace("-", "_")


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """``path`` opened read-only, so that no query, however malformed, can change a WikiSQL database."""
    return sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)


def memory_database(tables: Mapping[str, Mapping[str, Any]]) -> sqlite3.Connection:
    """An in-memory database in the ``.db`` files' layout from tables given as ``{id: {types, rows}}``
    (WikiSQL's ``tables.jsonl`` fields): ``table_<id>(col0 text|real, ...)``, text lowercased."""
    conn = sqlite3.connect(":memory:")
    for table_id, table in tables.items():
        types = ["real" if t == "real" else "text" for t in table["types"]]
        columns = ", ".join(f"col{i} {t}" for i, t in enumerate(types))
        name = _quote(table_name(table_id))
        conn.execute(f"CREATE TABLE {name} ({columns})")
        marks = ", ".join("?" * len(types))
        rows = [[v.lower() if isinstance(v, str) else v for v in row] for row in table["rows"]]
        # A real column's numeric strings (the hub stores every cell as text) become numbers by the
        # column's REAL affinity, as they are numbers in the .db files.
        conn.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)
    conn.commit()
    return conn


class Executor:
    """Runs WikiSQL queries against one SQLite database, each under a time limit."""

    def __init__(self, conn: sqlite3.Connection, timeout_s: float = 5.0) -> None:
        self.conn = conn
        self.timeout_s = timeout_s
        self._types: dict[str, dict[str, str]] = {}

    def run(self, table_id: str, sql: Mapping[str, Any]) -> list[Any]:
        """The result column of ``sql`` on table ``table_id``. Raises (sqlite3.Error, ValueError, ...)
        when the query cannot run: an unknown table or column, a bad operator, the time limit."""
        name = table_name(table_id)
        types = self._column_types(name)
        select = _column(sql["sel"], types)
        agg = AGG_OPS[_index(sql["agg"], AGG_OPS)]
        if agg:
            select = f"{agg}({select})"
        where, params = [], []
        for col, op, value in sql["conds"]:
            column = _column(col, types)
            if isinstance(value, str):
                value = value.lower()
            if types[column] == "real" and not isinstance(value, (int, float)):
                value = _to_number(value)
            # COND_OPS[3], "OP", is not SQL: such a query fails, as it does in WikiSQL.
            where.append(f"{column} {COND_OPS[_index(op, COND_OPS)]} ?")
            params.append(value)
        query = f"SELECT {select} AS result FROM {_quote(name)}"
        if where:
            query += " WHERE " + " AND ".join(where)
        deadline = time.monotonic() + self.timeout_s
        # SQLite calls the handler every 1000 VM instructions; a non-zero return aborts the query.
        self.conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            return [row[0] for row in self.conn.execute(query, params)]
        finally:
            self.conn.set_progress_handler(None, 0)

    def _column_types(self, name: str) -> dict[str, str]:
        if name not in self._types:
            info = self.conn.execute(f"PRAGMA table_info({_quote(name)})").fetchall()
            if not info:
                raise ValueError(f"no table {name} in the database")
            self._types[name] = {row[1]: str(row[2]).lower() for row in info}
        return self._types[name]


# -- helpers -------------------------------------------------------------------------------------------


def _index(value: Any, ops: Sequence[str]) -> int:
    # Guard against negative indices, which Python would quietly take from the end.
    index = int(value)
    if not 0 <= index < len(ops):
        raise IndexError(f"operator index {index} outside 0..{len(ops) - 1}")
    return index


def _column(index: Any, types: Mapping[str, str]) -> str:
    column = f"col{int(index)}"
    if column not in types:
        raise ValueError(f"no column {column}")
    return column


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace('"', '""') + '"'
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a WikiSQL value is a string or a number, not {value!r}")
    return repr(value)  # repr round-trips floats exactly


def _cond_set(conds: Sequence[Sequence[Any]]) -> set[tuple[int, int, str]]:
    return {(int(col), int(op), str(value).lower()) for col, op, value in conds}


def _to_number(value: str) -> float:
    """A number from a string value compared with a ``real`` column, as dbengine reads it (babel's
    ``parse_decimal`` in English: digit-group commas dropped; else the first number in the string)."""
    try:
        return float(Decimal(value.replace(",", "").strip()))
    except InvalidOperation:
        found = _FIRST_NUMBER.findall(value)
        if not found:
            raise ValueError(f"no number in {value!r}") from None
        return float(found[0])


class _Parser:
    """Reads the text form back against a header, backtracking over ambiguous column names."""

    def __init__(self, text: str, header: Sequence[str]) -> None:
        self.s = text.strip().split("\n", 1)[0].strip()
        # Longest names first, so "Score (2)" is tried before "Score"; sorted() is stable, so of two
        # identical names the first column is tried first.
        self.columns = sorted(
            ((i, str(name)) for i, name in enumerate(header) if name), key=lambda c: -len(c[1])
        )
        self._conds_memo: dict[int, list[list[Any]] | None] = {}

    def parse(self) -> dict[str, Any] | None:
        pos = self._keyword(0, "SELECT ")
        if pos is None:
            return None
        for sel, agg, end in self._select(pos):
            pos = self._keyword(end, " FROM table")
            if pos is None:
                continue
            if pos == len(self.s):
                return {"sel": sel, "agg": agg, "conds": []}
            pos = self._keyword(pos, " WHERE ")
            conds = self._conds(pos) if pos is not None else None
            if conds is not None:
                return {"sel": sel, "agg": agg, "conds": conds}
        return None

    def _keyword(self, pos: int, word: str) -> int | None:
        end = pos + len(word)
        return end if self.s[pos:end].lower() == word.lower() else None

    def _columns_at(self, pos: int) -> Iterator[tuple[int, int]]:
        for index, name in self.columns:
            end = pos + len(name)
            if self.s[pos:end].lower() == name.lower():
                yield index, end

    def _select(self, pos: int) -> Iterator[tuple[int, int, int]]:
        # (sel, agg, end) readings of the select expression starting at pos.
        for index, end in self._columns_at(pos):
            yield index, 0, end
        for agg in range(1, len(AGG_OPS)):
            start = self._keyword(pos, AGG_OPS[agg] + "(")
            if start is None:
                continue
            for index, end in self._columns_at(start):
                if self.s[end : end + 1] == ")":
                    yield index, agg, end + 1

    def _conds(self, pos: int) -> list[list[Any]] | None:
        # Memoised on pos: a failed reading of the rest is not retried along another path.
        if pos not in self._conds_memo:
            self._conds_memo[pos] = self._read_conds(pos)
        return self._conds_memo[pos]

    def _read_conds(self, pos: int) -> list[list[Any]] | None:
        for col, end in self._columns_at(pos):
            for op, symbol in enumerate(COND_OPS):
                start = self._keyword(end, f" {symbol} ")
                if start is None:
                    continue
                for value, stop in self._values(start):
                    cond = [col, op, value]
                    if stop == len(self.s):
                        return [cond]
                    rest_at = self._keyword(stop, " AND ")
                    rest = self._conds(rest_at) if rest_at is not None else None
                    if rest is not None:
                        return [cond, *rest]
        return None

    def _values(self, pos: int) -> Iterator[tuple[Any, int]]:
        # (value, end) readings of the value starting at pos.
        if self.s[pos : pos + 1] == '"':
            chars, i = [], pos + 1
            while i < len(self.s):
                if self.s[i] == '"':
                    if self.s[i + 1 : i + 2] != '"':
                        yield "".join(chars), i + 1
                        return
                    i += 1  # a doubled quote stands for one
                chars.append(self.s[i])
                i += 1
            return  # no closing quote
        number = _NUMBER.match(self.s, pos)
        if number:
            token = number.group()
            yield (int(token) if _INT.fullmatch(token) else float(token)), number.end()
