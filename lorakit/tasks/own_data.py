"""The user's own data: rows read from files (.csv .tsv .json .jsonl .parquet) or a dataset (a hub id, or a
local folder that ``datasets`` loads), split into train / validation / test as the recipe says, each row
with the place it came from (``FILE:LINE``) for error messages.

This module reads and places rows, and holds what the types share (``OwnDataTask``); what the columns mean
(texts and labels, prompts and completions) is the business of ``own_labeled`` and ``own_generation``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorakit.errors import UserError
from lorakit.tasks.base import Task
from lorakit.tasks.metrics import LOWER_IS_BETTER

if TYPE_CHECKING:
    from lorakit.recipe.schema import TaskSection

logger = logging.getLogger(__name__)

FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
DEFAULT_VALIDATION_SPLIT = 0.1
SPLIT_KEYS = {"train": "train_file", "validation": "validation_file", "test": "test_file"}


@dataclass
class Table:
    """Rows of one split as plain dicts, the column names of their source, and where each row is."""

    rows: list[dict[str, Any]]
    columns: list[str]
    places: list[str]  # FILE:LINE (or FILE: row N) of each row
    source: str  # the file or dataset split, for messages about the whole split
    # A dataset's ClassLabel columns: their class names in id order (the column holds ids).
    class_names: dict[str, list[str]] = field(default_factory=dict)


class OwnData:
    """The splits of a recipe's own-data ``task`` section, read once each, on first use."""

    def __init__(self, section: TaskSection) -> None:
        self.section = section
        self._tables: dict[str, Table] = {}

    @property
    def splits(self) -> list[str]:
        """train and validation always (validation may be held out of train); test when there is one."""
        s = self.section
        if s.dataset is None:
            has_test = s.test_file is not None
        else:
            has_test = "test" in s.splits if s.splits is not None else "test" in self._dataset_splits()
        return ["train", "validation", "test"] if has_test else ["train", "validation"]

    def source_of(self, split: str) -> str:
        """The file (or dataset split) that ``split`` is read from."""
        s = self.section
        if s.dataset is not None:
            return f"{s.dataset} ({self._split_name(split)})"
        path = getattr(s, SPLIT_KEYS[split])
        if path is None and split == "validation":
            return f"{s.train_file} (validation held out)"
        return str(path)

    def table(self, split: str) -> Table:
        """The rows of ``split``; train and a held-out validation come from the train source."""
        if split not in self._tables:
            self._tables.update(self._read(split))
        return self._tables[split]

    def training_source(self) -> Table:
        """Every row of the train source, held-out rows included (labels are taken from the whole file)."""
        if "_all_train" not in self._tables:
            self._tables["_all_train"] = self._read_source("train")
        return self._tables["_all_train"]

    # -- reading -----------------------------------------------------------------------------------

    def _read(self, split: str) -> dict[str, Table]:
        if split == "test" and "test" not in self.splits:
            raise UserError(
                "no test data: set task.test_file (or a test split in task.splits)", "task.test_file"
            )
        if split in ("train", "validation") and not self._has_own_validation():
            return self._hold_out()
        return {split: self._read_source(split)}

    def _has_own_validation(self) -> bool:
        s = self.section
        if s.dataset is None:
            return s.validation_file is not None
        if s.splits is not None:
            return "validation" in s.splits
        return "validation" in self._dataset_splits()

    def _hold_out(self) -> dict[str, Table]:
        """Train and validation from the train source: a seeded ``validation_split`` share held out."""
        whole = self.training_source()
        share = self.section.validation_split or DEFAULT_VALIDATION_SPLIT
        n = len(whole.rows)
        count = min(max(1, math.ceil(share * n)), n - 1) if n > 1 else 0
        held = set(np.random.default_rng(self.section.split_seed).permutation(n)[:count].tolist())
        logger.info(
            "validation: %d of %d rows held out of %s (seed %d)",
            count,
            n,
            whole.source,
            self.section.split_seed,
        )

        def part(keep: bool, source: str) -> Table:
            picked = [i for i in range(n) if (i in held) == keep]
            return Table(
                [whole.rows[i] for i in picked], whole.columns, [whole.places[i] for i in picked], source
            )

        return {"train": part(False, whole.source), "validation": part(True, self.source_of("validation"))}

    def _read_source(self, split: str) -> Table:
        s = self.section
        if s.dataset is not None:
            return self._read_dataset(split)
        key = SPLIT_KEYS[split]
        return read_file(str(getattr(s, key)), f"task.{key}")

    def _split_name(self, split: str) -> str:
        return (self.section.splits or {}).get(split, split)

    def _dataset_splits(self) -> list[str]:
        return list(self._dataset())

    def _dataset(self) -> Any:
        """The DatasetDict of ``task.dataset``: a ``save_to_disk`` folder, else ``load_dataset``."""
        if not hasattr(self, "_loaded"):
            import datasets

            name, config = str(self.section.dataset), self.section.dataset_config
            try:
                if Path(name, "dataset_dict.json").is_file() and config is None:
                    loaded = datasets.load_from_disk(name)
                else:
                    loaded = datasets.load_dataset(name, config)
            except Exception as exc:  # datasets raises many kinds (hub, file, config errors)
                text = " ".join(str(exc).split())[:300] or type(exc).__name__
                raise UserError(f"cannot load the dataset {name!r}: {text}", "task.dataset") from None
            if not isinstance(loaded, datasets.DatasetDict):
                raise UserError(f"{name!r} holds one split, not named splits", "task.dataset")
            self._loaded = loaded
        return self._loaded

    def _read_dataset(self, split: str) -> Table:
        loaded = self._dataset()
        name = self._split_name(split)
        if name not in loaded:
            raise UserError(
                f"no split {name!r} in {self.section.dataset}; it has {', '.join(loaded)}", "task.splits"
            )
        part = loaded[name]
        source = f"{self.section.dataset} ({name})"
        places = [f"{source}: row {i + 1}" for i in range(len(part))]
        return Table(part.to_list(), list(part.column_names), places, source, _class_names(part.features))


def _class_names(features: Any) -> dict[str, list[str]]:
    """The class names of a dataset's ClassLabel columns (or lists of ClassLabel, for multilabel)."""
    import datasets

    names = {}
    for column, feature in features.items():
        inner = getattr(feature, "feature", None)
        for candidate in (feature, inner):
            if isinstance(candidate, datasets.ClassLabel):
                names[column] = list(candidate.names)
    return names


class OwnDataTask(Task):
    """What every type of the user's own data shares: its splits and their sources, ``FILE:LINE`` of a row,
    and the metric that keeps the best adapter (``task.metric``, else ``default_metric``)."""

    default_metric: str
    metric_names: tuple[str, ...]

    def __init__(self, section: TaskSection) -> None:
        super().__init__(None)
        self.section = section
        self.name = str(section.type)
        self.data = OwnData(section)
        self.eval_splits = {"": "validation"}
        self.main_metric = section.metric or self.default_metric
        if self.main_metric not in self.metric_names:
            raise UserError(
                f"{self.main_metric!r} is not a {self.name} metric; "
                f"choose one of {', '.join(self.metric_names)}",
                "task.metric",
            )
        self.greater_is_better = self.main_metric not in LOWER_IS_BETTER

    @classmethod
    def from_section(cls, section: TaskSection) -> Task:
        """The task of a recipe's own-data ``task`` section."""
        return cls(section)

    @property
    def splits(self) -> list[str]:
        """train, validation and (with test data) test."""
        return self.data.splits

    def source_of(self, split: str) -> str:
        """The file (or dataset split) ``split`` comes from."""
        return self.data.source_of(split)

    def row_where(self, split: str, index: int) -> str:
        """``FILE:LINE`` of row ``index`` of ``split``."""
        return self.data.table(split).places[index]


def read_file(path: str, key: str) -> Table:
    """The rows of a data file, its format from the extension; UserError naming ``key`` (the recipe key)
    for a missing file or an unknown extension, and ``FILE:LINE`` for a malformed line."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(
            f"unknown data format {suffix or '(no extension)'!r} of {path}; use {' '.join(FORMATS)}", key
        )
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "file not found"
        raise UserError(f"{what}: {path}", key)
    try:
        if suffix in (".csv", ".tsv"):
            rows, columns, places = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            rows, columns, places = _read_parquet(path)
        else:
            rows, columns, places = _read_json(path, lines=suffix == ".jsonl")
    except UnicodeDecodeError as exc:
        raise UserError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror or exc}", path) from None
    return Table(rows, columns, places, path)


def _read_delimited(path: str, delimiter: str) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    # newline="" lets the csv module take CRLF line ends and quoted newlines itself; utf-8-sig drops a BOM.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise UserError("empty file: expected a header row naming the columns", path)
            rows, places = [], []
            start = reader.line_num + 1
            for fields in reader:
                if not fields or fields == [""]:
                    start = reader.line_num + 1
                    continue
                if len(fields) != len(header):
                    raise UserError(
                        f"{len(fields)} fields where the header has {len(header)}", f"{path}:{start}"
                    )
                rows.append(dict(zip(header, fields, strict=True)))
                places.append(f"{path}:{start}")
                start = reader.line_num + 1
        except csv.Error as exc:
            raise UserError(
                f"malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {exc}", f"{path}:{reader.line_num}"
            ) from None
    return rows, header, places


def _read_parquet(path: str) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, ValueError) as exc:
        raise UserError(f"not a Parquet file ({' '.join(str(exc).split())[:200]})", path) from None
    return (
        table.to_pylist(),
        list(table.column_names),
        [f"{path}: row {i + 1}" for i in range(table.num_rows)],
    )


def _json_lines(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"invalid JSON: {exc.msg} (column {exc.colno})", f"{path}:{lineno}") from None


def _read_json(path: str, lines: bool) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """JSON lines (.jsonl, and .json files holding one object a line), or a .json array of objects."""
    records: list[tuple[str, Any]]
    if not lines:
        text = Path(path).read_text(encoding="utf-8-sig")
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": a second object follows, so JSON lines
                raise UserError(f"invalid JSON: {exc.msg}", f"{path}:{exc.lineno}") from None
            whole = None
        if whole is not None and not isinstance(whole, list):
            raise UserError("expected a JSON array of objects, or one JSON object a line", path)
        if whole is not None:
            records = [(f"{path}: row {i + 1}", r) for i, r in enumerate(whole)]
        else:
            records = [(f"{path}:{n}", r) for n, r in _json_lines(path)]
    else:
        records = [(f"{path}:{n}", r) for n, r in _json_lines(path)]
    columns: dict[str, None] = {}
    for place, record in records:
        if not isinstance(record, dict):
            raise UserError(f"expected a JSON object, found {type(record).__name__}", place)
        columns.update(dict.fromkeys(record))
    return [r for _, r in records], list(columns), [p for p, _ in records]


def require_columns(table: Table, wanted: dict[str, str | None]) -> None:
    """UserError naming the recipe key and listing the columns present when a wanted column is missing.
    ``wanted``: recipe key -> column name (None: not used)."""
    for key, column in wanted.items():
        if column is not None and column not in table.columns:
            present = ", ".join(table.columns) or "none"
            raise UserError(f"no column {column!r} (task.{key}); the columns are: {present}", table.source)
