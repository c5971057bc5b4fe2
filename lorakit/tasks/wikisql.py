"""WikiSQL (Zhong et al., 2017): a question about one table to the SQL query that answers it.

Sources, per split (train / validation / test):

* ``data_dir`` with WikiSQL's original files for the split's stem (``train``, ``dev``, ``test``):
  ``{stem}.jsonl`` (questions: ``phase, table_id, question, sql{sel, agg, conds}``), ``{stem}.tables.jsonl``
  (tables: ``id, header, types, rows``) and, for execution accuracy, ``{stem}.db``;
* the hub (``data_dir`` None): ``Salesforce/wikisql``, read from its Parquet export. Its condition values
  are all strings (the hub's loader applied ``str()``), so its targets quote numbers that the original
  files leave bare; both metrics treat ``3`` and ``"3"`` alike.

Prompt template (the header as the table's own names, the question with its whitespace collapsed)::

    prompt = "Table: {header[0]} | {header[1]} | ...\\nQuestion: {question}\\nSQL:"
    target = " " + sql_to_text(sql, header)

e.g. ``"Table: Player | No. | Position\\nQuestion: Who wears number 3?\\nSQL:"`` and
``' SELECT Player FROM table WHERE No. = 3'`` (text form: ``lorakit.tasks.wikisql_sql``).

Columns. train: ``prompt``, ``target``. validation and test, one row per question: ``prompt``, ``target``,
``references`` (``[target]``), ``question``, ``table_id``, ``header`` (list of str), ``sql`` (the gold query
as JSON: ``{"sel", "agg", "conds": [[col, op, value], ...]}``) and ``wikisql_split`` (the file stem whose
``.db`` holds the table).

Metrics, in percent: ``logical_form_accuracy`` (WikiSQL's query equality; the paper's measure and the main
metric, since it needs no database), ``parse_rate`` (predictions that read as a query over the header) and,
when the tables can be reached, ``execution_accuracy`` (the prediction's result equals the gold query's).
Tables are reached through ``{stem}.db`` opened read-only, or, for the hub, an in-memory copy built from the
hub's rows. A prediction that does not parse, fails in SQLite or runs past the time limit is wrong; none
stops the evaluation.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import datasets

from lorakit.errors import UserError
from lorakit.tasks.base import Task, TaskKind
from lorakit.tasks.wikisql_sql import (
    Executor,
    logical_form_match,
    memory_database,
    open_readonly,
    sql_to_text,
    text_to_sql,
)

logger = logging.getLogger(__name__)

HUB_ID = "Salesforce/wikisql"
# The hub repo's main branch holds only a loading script, which datasets no longer runs.
HUB_REVISION = "refs/convert/parquet"

_STEMS: dict[str, str] = {"train": "train", "validation": "dev", "test": "test"}
_SPLIT_OF_STEM = {stem: split for split, stem in _STEMS.items()}

# (question, table_id, header, sql) for one question.
_Record = tuple[str, str, list[str], dict[str, Any]]


def build_prompt(question: str, header: Sequence[str]) -> str:
    """The prompt for ``question`` about a table with columns ``header`` (module docstring)."""
    return f"Table: {' | '.join(header)}\nQuestion: {' '.join(question.split())}\nSQL:"


class WikiSQLTask(Task):
    """WikiSQL as text-to-SQL generation, for GPT-2 with LoRA."""

    name = "wikisql"
    kind: TaskKind = "generation"
    num_labels = 0
    main_metric = "logical_form_accuracy"
    eval_splits = {"": "validation"}
    encoding = "causal_lm"
    execution_timeout_s = 5.0  # per query; WikiSQL's queries take milliseconds

    def __init__(self, data_dir: str | None = None) -> None:
        super().__init__(data_dir)
        # Hub tables of the evaluation splits loaded so far, id -> {types, rows}, for execution.
        self._hub_tables: dict[str, dict[str, Any]] = {}

    @property
    def splits(self) -> list[str]:
        """The split names ``load`` accepts."""
        return list(_STEMS)

    def prompt_from_input(self, text: str) -> str:
        """The prompt for a JSON object with ``question`` (a string) and ``header`` (column names).
        Raises ValueError otherwise."""
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        header = record.get("header") if isinstance(record, dict) else None
        question = record.get("question") if isinstance(record, dict) else None
        if not isinstance(question, str) or not isinstance(header, list) or not header:
            raise ValueError('expected a JSON object {"question": "...", "header": ["column", ...]}')
        return build_prompt(question, [str(name) for name in header])

    def clean_output(self, text: str) -> str:
        """The query on the generated text's first line, which is what ``text_to_sql`` reads."""
        return next(iter(text.splitlines()), "").strip()

    def load(self, split: str) -> datasets.Dataset:
        """Rows of ``split`` (columns in the module docstring), from ``data_dir`` or the hub."""
        self.check_split(split)
        is_train = split == self.train_split
        if self.data_dir is None:
            records = list(self._hub_records(split, keep_tables=not is_train))
        else:
            records = list(self._local_records(_STEMS[split]))
        prompts = [build_prompt(question, header) for question, _, header, _ in records]
        targets = [" " + sql_to_text(sql, header) for _, _, header, sql in records]
        if is_train:
            return datasets.Dataset.from_dict({"prompt": prompts, "target": targets})
        features = datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "target": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
                "question": datasets.Value("string"),
                "table_id": datasets.Value("string"),
                "header": datasets.Sequence(datasets.Value("string")),
                "sql": datasets.Value("string"),
                "wikisql_split": datasets.Value("string"),
            }
        )
        return datasets.Dataset.from_dict(
            {
                "prompt": prompts,
                "target": targets,
                "references": [[t.strip()] for t in targets],
                "question": [r[0] for r in records],
                "table_id": [r[1] for r in records],
                "header": [r[2] for r in records],
                "sql": [json.dumps(r[3], ensure_ascii=False) for r in records],
                "wikisql_split": [_STEMS[split]] * len(records),
            },
            features=features,
        )

    def compute_metrics(self, predictions: Sequence[Any], examples: datasets.Dataset) -> dict[str, float]:
        """Logical-form accuracy, parse rate and (when the tables can be reached) execution accuracy of
        ``predictions`` (SQL text, one per row of ``examples``), in percent."""
        golds = [json.loads(s) for s in examples["sql"]]
        headers = [list(h) for h in examples["header"]]
        if len(predictions) != len(golds):
            raise ValueError(f"{len(predictions)} predictions for {len(golds)} examples")
        parsed = [text_to_sql(str(p), h) for p, h in zip(predictions, headers, strict=True)]
        n = len(golds)
        result = {
            "logical_form_accuracy": _percent(
                sum(logical_form_match(p, g) for p, g in zip(parsed, golds, strict=True)), n
            ),
            "parse_rate": _percent(sum(p is not None for p in parsed), n),
        }
        execution = self._execution_accuracy(
            parsed, golds, list(examples["table_id"]), list(examples["wikisql_split"])
        )
        if execution is not None:
            result["execution_accuracy"] = execution
        return result

    # -- execution -----------------------------------------------------------------------------------

    def _execution_accuracy(
        self,
        parsed: list[dict[str, Any] | None],
        golds: list[dict[str, Any]],
        table_ids: list[str],
        stems: list[str],
    ) -> float | None:
        by_stem: dict[str, list[int]] = {}
        for i, stem in enumerate(stems):
            by_stem.setdefault(stem, []).append(i)
        correct = 0
        for stem, indices in by_stem.items():
            conn = self._connect(stem, {table_ids[i] for i in indices})
            if conn is None:
                return None
            with closing(conn):
                executor = Executor(conn, self.execution_timeout_s)
                correct += sum(_same_result(executor, table_ids[i], parsed[i], golds[i]) for i in indices)
        return _percent(correct, len(golds))

    def _connect(self, stem: str, table_ids: set[str]) -> sqlite3.Connection | None:
        """A connection to the database holding ``stem``'s tables, or None when there is none."""
        if self.data_dir is not None:
            path = Path(self.data_dir) / f"{stem}.db"
            if not path.is_file():
                logger.warning("%s not found; execution accuracy is not reported", path)
                return None
            return open_readonly(path)
        if not table_ids <= self._hub_tables.keys():
            # Another task object loaded these rows; read the split again for its tables.
            deque(self._hub_records(_SPLIT_OF_STEM[stem], keep_tables=True), maxlen=0)
        return memory_database({t: self._hub_tables[t] for t in table_ids if t in self._hub_tables})

    # -- sources -------------------------------------------------------------------------------------

    def _local_records(self, stem: str) -> Iterator[_Record]:
        root = Path(self.data_dir or ".")
        questions, tables = root / f"{stem}.jsonl", root / f"{stem}.tables.jsonl"
        for path in (questions, tables):
            if not path.is_file():
                raise UserError(f"no WikiSQL file {path}", where="task.data_dir")
        headers: dict[str, list[str]] = {}
        for table, where in _jsonl(tables):
            try:
                headers[table["id"]] = [str(name) for name in table["header"]]
            except (KeyError, TypeError) as err:
                raise UserError(f"expected a WikiSQL table with id and header ({err})", where) from err
        for record, where in _jsonl(questions):
            try:
                header = headers[record["table_id"]]
                sql = _check_sql(record["sql"], len(header))
                yield record["question"], record["table_id"], header, sql
            except KeyError as err:
                raise UserError(f"missing {err} (or its table in {tables.name})", where) from err
            except (TypeError, ValueError) as err:
                raise UserError(f"bad WikiSQL query: {err}", where) from err

    def _hub_records(self, split: str, keep_tables: bool) -> Iterator[_Record]:
        raw = datasets.load_dataset(HUB_ID, revision=HUB_REVISION, split=split)
        for row in raw:
            table, sql = row["table"], row["sql"]
            header = list(table["header"])
            if keep_tables:
                self._hub_tables[table["id"]] = {"types": list(table["types"]), "rows": table["rows"]}
            query = {"sel": sql["sel"], "agg": sql["agg"], "conds": _hub_conds(sql["conds"])}
            yield row["question"], table["id"], header, _check_sql(query, len(header))


def _hub_conds(conds: Any) -> list[list[Any]]:
    # The hub's conds are a sequence of {column_index, operator_index, condition}; datasets hands such
    # a sequence back as one dict of lists, or as a list of dicts, depending on how its feature is typed.
    if isinstance(conds, Mapping):
        columns = zip(conds["column_index"], conds["operator_index"], conds["condition"], strict=True)
        return [[int(c), int(o), v] for c, o, v in columns]
    return [[int(c["column_index"]), int(c["operator_index"]), c["condition"]] for c in conds]


def _check_sql(sql: Mapping[str, Any], n_columns: int) -> dict[str, Any]:
    """``sql`` as a plain dict, with every index checked against the header and the operator lists."""
    query = {
        "sel": int(sql["sel"]),
        "agg": int(sql["agg"]),
        "conds": [[int(c), int(o), v] for c, o, v in sql["conds"]],
    }
    bad = [i for i in [query["sel"], *(c for c, _, _ in query["conds"])] if not 0 <= i < n_columns]
    if bad or not 0 <= query["agg"] < 6 or any(not 0 <= o < 4 for _, o, _ in query["conds"]):
        raise ValueError(f"index out of range in {dict(sql)} for {n_columns} columns")
    return query


def _same_result(
    executor: Executor, table_id: str, pred: dict[str, Any] | None, gold: dict[str, Any]
) -> bool:
    if pred is None:
        return False
    # Any failure counts the example wrong and moves on: a bad prediction must never stop evaluation,
    # and a gold query that cannot run cannot confirm a prediction.
    try:
        expected = executor.run(table_id, gold)
    except Exception as err:
        logger.debug("gold query for %s failed: %s", table_id, err)
        return False
    try:
        return executor.run(table_id, pred) == expected
    except Exception:
        return False


def _jsonl(path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as err:
                raise UserError(f"not a JSON line ({err})", where) from err


def _percent(count: int, total: int) -> float:
    return 100.0 * count / total if total else 0.0
