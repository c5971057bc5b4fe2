"""WikiSQL: the SQL text form on every real dev query, and both metrics on a database in WikiSQL's layout."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import datasets
import pytest
from conftest import SHARED_DATA

from lorakit.errors import UserError
from lorakit.tasks import get_task
from lorakit.tasks.wikisql import HUB_ID, WikiSQLTask, build_prompt
from lorakit.tasks.wikisql_sql import (
    Executor,
    logical_form_match,
    memory_database,
    open_readonly,
    sql_to_text,
    text_to_sql,
)

DEV_JSONL = SHARED_DATA / "wikisql" / "dev.jsonl"  # the real dev questions; no tables, no .db

# Column names that a naive reader would split wrongly; one would fail for each of these traps.
AWKWARD = ["Name (AND) WHERE", "Name", "Score = 2", "a AND b", 'Pts "net"', "Rank", "Rank (2)", "FROM table"]


def _dev_queries() -> list[dict[str, Any]]:
    with open(DEV_JSONL, encoding="utf-8") as f:
        return [json.loads(line)["sql"] for line in f]


def _width(sql: dict[str, Any]) -> int:
    return max([sql["sel"], *(c for c, _, _ in sql["conds"])]) + 1


def test_round_trip_every_dev_query() -> None:
    queries = _dev_queries()
    assert len(queries) == 8421
    for sql in queries:
        n = _width(sql)
        for header in ([f"col{i}" for i in range(n)], [f"{AWKWARD[i % len(AWKWARD)]} {i}" for i in range(n)]):
            assert text_to_sql(sql_to_text(sql, header), header) == sql, (sql, header)


def test_text_form() -> None:
    header = ["Player", "No.", "Name (AND) WHERE", "Notes"]
    sql = {"sel": 2, "agg": 3, "conds": [[1, 0, 3], [0, 2, 'Don "Dino" AND Lee'], [3, 1, 1939.0]]}
    text = sql_to_text(sql, header)
    assert text == (
        'SELECT COUNT(Name (AND) WHERE) FROM table WHERE No. = 3 AND Player < "Don ""Dino"" AND Lee" '
        "AND Notes > 1939.0"
    )
    assert text_to_sql(text, header) == sql


def test_lenient_reading() -> None:
    header = ["Player", "No."]
    assert text_to_sql("select player from TABLE where no. = 3", header) == {
        "sel": 0,
        "agg": 0,
        "conds": [[1, 0, 3]],
    }
    # Generation may run past the query; the first line is the query.
    assert text_to_sql(" SELECT MAX(No.) FROM table\nQuestion: more", header) == {
        "sel": 1,
        "agg": 1,
        "conds": [],
    }
    bare = text_to_sql("SELECT No. FROM table WHERE No. > -2.5e1 AND No. < 7", header)
    assert bare == {"sel": 1, "agg": 0, "conds": [[1, 1, -25.0], [1, 2, 7]]}
    # A bare value must be a number: a bare word is not read (it could hide a cut-off " AND").
    assert text_to_sql("SELECT No. FROM table WHERE Player = butler cc", header) is None


def test_ambiguous_texts_read_as_documented() -> None:
    assert text_to_sql("SELECT Score FROM table", ["Score", "Score"]) == {"sel": 0, "agg": 0, "conds": []}
    assert text_to_sql("SELECT MAX(x) FROM table", ["x", "MAX(x)"]) == {"sel": 1, "agg": 0, "conds": []}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SELECT",
        "SELECT Foo FROM table",
        "SELECT col0 FROM table WHERE",
        'SELECT col0 FROM table WHERE col1 = "open',
        "SELECT col0 FROM table WHERE col1 == 3",
        "SELECT col0 FROM table WHERE col1 = 3 AND",
        "SELECT MAX(col0 FROM table",
        "SELECT col0 FROM table ORDER BY col1",
        "DROP TABLE table_1",
        None,
    ],
)
def test_unparsable_text_is_none(text: Any) -> None:
    assert text_to_sql(text, ["col0", "col1"]) is None


def test_logical_form_rules() -> None:
    gold = {"sel": 1, "agg": 0, "conds": [[0, 0, "Duke"], [2, 1, 3]]}
    assert logical_form_match({"sel": 1, "agg": 0, "conds": [[2, 1, "3"], [0, 0, "DUKE"]]}, gold)
    assert not logical_form_match({"sel": 1, "agg": 0, "conds": [[2, 1, 3.0], [0, 0, "Duke"]]}, gold)
    assert not logical_form_match({"sel": 1, "agg": 3, "conds": gold["conds"]}, gold)
    assert not logical_form_match({"sel": 1, "agg": 0, "conds": [[0, 0, "Duke"]]}, gold)
    assert not logical_form_match(None, gold)


def test_gold_against_gold_on_every_dev_query() -> None:
    queries = _dev_queries()
    headers = [[f"col{i}" for i in range(_width(sql))] for sql in queries]
    examples = datasets.Dataset.from_dict(
        {
            "sql": [json.dumps(sql) for sql in queries],
            "header": headers,
            "table_id": ["1-1-1"] * len(queries),
            "wikisql_split": ["dev"] * len(queries),
        }
    )
    task = WikiSQLTask(str(DEV_JSONL.parent))  # no dev.db there: no execution accuracy
    predictions = [sql_to_text(sql, header) for sql, header in zip(queries, headers, strict=True)]
    result = task.compute_metrics(predictions, examples)
    assert result == {"logical_form_accuracy": 100.0, "parse_rate": 100.0}
    predictions[0] = "SELECT nothing useful"
    result = task.compute_metrics(predictions, examples)
    assert result["logical_form_accuracy"] == pytest.approx(100.0 * 8420 / 8421)
    assert result["parse_rate"] == pytest.approx(100.0 * 8420 / 8421)


# -- a database in WikiSQL's layout --------------------------------------------------------------------

# The first dev table (1-10015132-11), abridged, and a test-made table with real columns.
TABLES = [
    {
        "id": "1-10015132-11",
        "header": ["Player", "No.", "Nationality", "Position", "Years in Toronto", "School/Club Team"],
        "types": ["text"] * 6,
        "rows": [
            ["Antonio Lang", "21", "United States", "Guard-Forward", "1999-2000", "Duke"],
            ["Voshon Lenard", "2", "United States", "Guard", "2002-03", "Minnesota"],
            ["Martin Lewis", "32, 44", "United States", "Guard-Forward", "1996-97", "Butler CC (KS)"],
            ["Brad Lohaus", "33", "United States", "Forward-Center", "1996", "Iowa"],
            ["Kyle Lowry", "3", "United States", "Guard", "2012-Present", "Villanova"],
        ],
    },
    {
        "id": "2-99-1",
        "header": ["Season", "Wins", "Team (AND) WHERE"],
        "types": ["real", "real", "text"],
        "rows": [[2001, 10, "Raptors"], [2002, 24, "Raptors"], [2003, 33, "Nets"]],
    },
]

# (question, table, gold sql, prediction, logical form right, execution right)
CASES = [
    (
        "What position does the player who played for butler cc (ks) play?",
        "1-10015132-11",
        {"sel": 3, "agg": 0, "conds": [[5, 0, "Butler CC (KS)"]]},
        'SELECT Position FROM table WHERE School/Club Team = "BUTLER cc (KS)"',  # case differs
        True,
        True,
    ),
    (
        "How many schools did player number 3 play at?",
        "1-10015132-11",
        {"sel": 5, "agg": 3, "conds": [[1, 0, "3"]]},
        'SELECT COUNT(School/Club Team) FROM table WHERE No. OP "3"',  # reads, but OP is not SQL
        False,
        False,
    ),
    (
        "How many wins did the Nets have?",
        "2-99-1",
        {"sel": 1, "agg": 0, "conds": [[2, 0, "Nets"]]},
        'SELECT Wins FROM table WHERE Team (AND) WHERE = "Raptors"',  # wrong
        False,
        False,
    ),
    (
        "What is the most wins after 2001?",
        "2-99-1",
        {"sel": 1, "agg": 1, "conds": [[0, 1, 2001]]},
        "SELECT MAX(Wins) FROM table",  # another query, same answer
        False,
        True,
    ),
    (
        "Which team played in 2002?",
        "2-99-1",
        {"sel": 2, "agg": 0, "conds": [[0, 0, 2002]]},
        'SELECT Team (AND) WHERE FROM table WHERE Season = "2,002"',  # a real column reads "2,002" as 2002
        False,
        True,
    ),
    (
        "Which team won 10 games?",
        "2-99-1",
        {"sel": 2, "agg": 0, "conds": [[1, 0, 10]]},
        'SELECT Team (AND) WHERE FROM table WHERE Wins = "ten"',  # no number for a real column: fails
        False,
        False,
    ),
    (
        "Who played for Duke?",
        "1-10015132-11",
        {"sel": 0, "agg": 0, "conds": [[5, 0, "Duke"]]},
        "I think it is Antonio Lang",  # unparsable
        False,
        False,
    ),
]


def _write_wikisql(folder: Path, stem: str = "dev") -> Path:
    """WikiSQL's files for ``stem``: questions, tables, and a .db laid out as the release's."""
    with open(folder / f"{stem}.tables.jsonl", "w", encoding="utf-8") as f:
        for table in TABLES:
            f.write(json.dumps(table) + "\n")
    with open(folder / f"{stem}.jsonl", "w", encoding="utf-8") as f:
        for question, table_id, sql, *_ in CASES:
            record = {"phase": 1, "table_id": table_id, "question": question, "sql": sql}
            f.write(json.dumps(record) + "\n")
    conn = sqlite3.connect(folder / f"{stem}.db")
    for table in TABLES:
        name = "table_" + table["id"].replace("-", "_")
        columns = ", ".join(f"col{i} {t}" for i, t in enumerate(table["types"]))
        conn.execute(f"CREATE TABLE {name} ({columns})")
        rows = [[v.lower() if isinstance(v, str) else float(v) for v in row] for row in table["rows"]]
        conn.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * len(table['types']))})", rows)
    conn.commit()
    conn.close()
    return folder


EXPECTED = {
    "logical_form_accuracy": pytest.approx(100.0 * sum(c[4] for c in CASES) / len(CASES)),
    "execution_accuracy": pytest.approx(100.0 * sum(c[5] for c in CASES) / len(CASES)),
    "parse_rate": pytest.approx(100.0 * (len(CASES) - 1) / len(CASES)),
}


def test_registry_and_contract(tmp_path: Path) -> None:
    task = get_task("wikisql", str(tmp_path))
    assert isinstance(task, WikiSQLTask)
    assert (task.kind, task.num_labels, task.main_metric) == ("generation", 0, "logical_form_accuracy")
    assert task.eval_splits == {"": "validation"} and task.splits == ["train", "validation", "test"]
    with pytest.raises(UserError, match="dev.jsonl"):
        task.load("validation")
    with pytest.raises(UserError, match="unknown split"):
        task.load("dev")


def test_local_rows(tmp_path: Path) -> None:
    ds = WikiSQLTask(str(_write_wikisql(tmp_path))).load("validation")
    assert ds.column_names == [
        "prompt",
        "target",
        "references",
        "question",
        "table_id",
        "header",
        "sql",
        "wikisql_split",
    ]
    row = ds[0]
    assert row["prompt"] == (
        "Table: Player | No. | Nationality | Position | Years in Toronto | School/Club Team\n"
        "Question: What position does the player who played for butler cc (ks) play?\nSQL:"
    )
    assert row["target"] == ' SELECT Position FROM table WHERE School/Club Team = "Butler CC (KS)"'
    assert row["references"] == [row["target"].strip()]
    assert json.loads(row["sql"]) == CASES[0][2]
    assert (row["table_id"], row["wikisql_split"]) == ("1-10015132-11", "dev")
    assert ds[3]["target"] == " SELECT MAX(Wins) FROM table WHERE Season > 2001"
    train = WikiSQLTask(str(_write_wikisql(tmp_path, "train"))).load("train")
    assert train.column_names == ["prompt", "target"] and len(train) == len(CASES)


def test_metrics_on_a_wikisql_database(tmp_path: Path) -> None:
    task = WikiSQLTask(str(_write_wikisql(tmp_path)))
    examples = task.load("validation")
    golds = task.compute_metrics(list(examples["target"]), examples)
    assert golds == {"logical_form_accuracy": 100.0, "parse_rate": 100.0, "execution_accuracy": 100.0}
    assert task.compute_metrics([c[3] for c in CASES], examples) == EXPECTED


def test_database_is_read_only_and_time_limited(tmp_path: Path) -> None:
    db = _write_wikisql(tmp_path) / "dev.db"
    before = db.read_bytes()
    conn = open_readonly(db)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM table_1_10015132_11")
    assert Executor(conn).run("1-10015132-11", {"sel": 0, "agg": 3, "conds": []}) == [5]
    conn.close()
    assert db.read_bytes() == before

    big = memory_database({"1-1-1": {"types": ["real"], "rows": [[i] for i in range(50_000)]}})
    query = {"sel": 0, "agg": 4, "conds": [[0, 1, 10]]}
    with pytest.raises(sqlite3.OperationalError, match="interrupt"):
        Executor(big, timeout_s=0.0).run("1-1-1", query)
    assert Executor(big).run("1-1-1", query) == [sum(range(11, 50_000))]


def _hub_rows() -> list[dict[str, Any]]:
    # The hub's shape: the table inlined (cells as strings), conds as a dict of lists, values as strings.
    tables = {t["id"]: t for t in TABLES}
    rows = []
    for question, table_id, sql, *_ in CASES:
        table = tables[table_id]
        conds = {
            "column_index": [c for c, _, _ in sql["conds"]],
            "operator_index": [o for _, o, _ in sql["conds"]],
            "condition": [str(v) for _, _, v in sql["conds"]],
        }
        rows.append(
            {
                "phase": 1,
                "question": question,
                "table": {
                    "header": table["header"],
                    "page_title": "",
                    "page_id": "",
                    "types": table["types"],
                    "id": table_id,
                    "section_title": "",
                    "caption": "",
                    "rows": [[str(v) for v in row] for row in table["rows"]],
                    "name": "",
                },
                "sql": {"human_readable": "", "sel": sql["sel"], "agg": sql["agg"], "conds": conds},
            }
        )
    return rows


def test_hub_source(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    def fake_load_dataset(path: str, **kwargs: Any) -> datasets.Dataset:
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(_hub_rows())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = WikiSQLTask(None)
    examples = task.load("validation")
    assert calls[0][0] == HUB_ID and calls[0][1]["split"] == "validation"
    local = WikiSQLTask(str(_write_wikisql(tmp_path))).load("validation")
    assert examples["prompt"] == local["prompt"]
    # The hub's values are strings, so its targets quote the numbers that the original files leave bare.
    assert examples[3]["target"] == ' SELECT MAX(Wins) FROM table WHERE Season > "2001"'
    # Execution runs on in-memory tables built from the hub's rows; a fresh task reads them again.
    assert task.compute_metrics([c[3] for c in CASES], examples) == EXPECTED
    assert WikiSQLTask(None).compute_metrics([c[3] for c in CASES], examples) == EXPECTED


def test_prompt_collapses_whitespace() -> None:
    assert build_prompt(" Who  won?\n", ["A", "B"]) == "Table: A | B\nQuestion: Who won?\nSQL:"
