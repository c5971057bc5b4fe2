"""The user's own labelled texts: classification (one class a row), regression (a number a row) and multilabel
(a set of class names a row), from ``task.text_column`` (and ``text_pair_column``, encoded as a pair) and
``task.label_column``.

Labels: class names map to ids by ``task.labels``, or by the sorted distinct labels of the train source
(numerically when every label is an integer). A label outside them is an error naming file, line and
label, never a silent -1. Rows have ``text_a``, ``text_b``, ``label`` and ``row`` (the row's index in its
split as read, for error messages about it).
"""

from __future__ import annotations

import json
import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lorakit.errors import UserError
from lorakit.tasks.base import TaskKind
from lorakit.tasks.metrics import (
    classification_metrics,
    multilabel_metrics,
    regression_metrics,
)
from lorakit.tasks.own_data import OwnDataTask, require_columns

if TYPE_CHECKING:
    import datasets


def label_text(value: Any) -> str | None:
    """A label cell as the class name it stands for: integers and integral floats as digits (a Parquet
    ``1.0`` is class ``1``), text as written; None for an empty cell."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    return text if text.strip() else None


def sorted_labels(names: set[str]) -> list[str]:
    """Class names in id order when the recipe gives none: numeric order when all are integers."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


class OwnLabeledTask(OwnDataTask):
    """The shared part of the three labelled types: texts, labels and their checks."""

    kind: TaskKind

    def load(self, split: str) -> datasets.Dataset:
        """Rows of ``split``: ``text_a``, ``text_b``, ``label``, ``row``."""
        import datasets

        self.check_split(split)
        table = self.data.table(split)
        s = self.section
        require_columns(
            table,
            {
                "text_column": s.text_column,
                "text_pair_column": s.text_pair_column,
                "label_column": s.label_column,
            },
        )
        texts_a, texts_b, labels = [], [], []
        names = table.class_names.get(str(s.label_column))
        for row, place in zip(table.rows, table.places, strict=True):
            texts_a.append(_text(row.get(s.text_column), "task.text_column", place))
            texts_b.append(
                _text(row.get(s.text_pair_column), "task.text_pair_column", place)
                if s.text_pair_column
                else None
            )
            labels.append(self.parse_label(_named(row.get(s.label_column), names, place), place, split))
        return datasets.Dataset.from_dict(
            {"text_a": texts_a, "text_b": texts_b, "label": labels, "row": list(range(len(labels)))},
            features=datasets.Features(
                {
                    "text_a": datasets.Value("string"),
                    "text_b": datasets.Value("string"),
                    "label": self.label_feature(),
                    "row": datasets.Value("int64"),
                }
            ),
        )

    @abstractmethod
    def parse_label(self, value: Any, place: str, split: str) -> Any:
        """The label of one row in the model's form; UserError at ``place`` for a label that is not one."""

    @abstractmethod
    def label_feature(self) -> Any:
        """The ``datasets`` feature of the ``label`` column."""

    def _known_labels(self) -> list[str]:
        """``task.labels``, or the sorted distinct labels of the whole train source (held-out rows too)."""
        if self.section.labels is not None:
            return list(self.section.labels)
        if not hasattr(self, "_labels"):
            table = self.data.training_source()
            column = str(self.section.label_column)
            require_columns(table, {"label_column": column})
            if column in table.class_names:  # a dataset's ClassLabel: its own names, in its id order
                self._labels = list(table.class_names[column])
                return self._labels
            names: set[str] = set()
            for row, place in zip(table.rows, table.places, strict=True):
                names.update(self.label_names_in(row.get(column), place))
            if not names:
                raise UserError("no labels in the train data", table.source)
            self._labels = sorted_labels(names)
        return self._labels

    def label_names_in(self, value: Any, place: str) -> list[str]:
        """The class names one label cell holds."""
        name = label_text(value)
        if name is None:
            raise UserError("empty label (task.label_column)", place)
        return [name]

    def _class_id(self, name: str, place: str) -> int:
        names = self.label_names or []
        if name not in self._ids:
            if self.section.labels is not None:
                raise UserError(f"label {name!r} is not one of task.labels ({', '.join(names)})", place)
            raise UserError(
                f"label {name!r} never occurs in the train data (labels: {', '.join(names)})", place
            )
        return self._ids[name]

    @property
    def _ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names or [])}


class ClassesTask(OwnLabeledTask):
    """Labels that are classes (one a row, or a set a row): their names, and so the head's width."""

    @property
    def label_names(self) -> list[str]:  # type: ignore[override]
        """Class names in id order."""
        return self._known_labels()

    @property
    def num_labels(self) -> int:  # type: ignore[override]
        """The number of classes."""
        return len(self.label_names)


class OwnClassificationTask(ClassesTask):
    """One class a row: cross-entropy, arg-max predictions; accuracy, macro-F1, MCC."""

    kind: TaskKind = "classification"
    default_metric = "accuracy"
    metric_names = ("accuracy", "macro_f1", "mcc")

    def parse_label(self, value: Any, place: str, split: str) -> int:
        """The class id of one label cell."""
        return self._class_id(self.label_names_in(value, place)[0], place)

    def label_feature(self) -> Any:
        """Class ids."""
        import datasets

        return datasets.Value("int64")

    def compute_metrics(self, predictions: Sequence[Any], examples: datasets.Dataset) -> dict[str, float]:
        """Accuracy, macro-F1 and MCC in percent."""
        return classification_metrics(np.asarray(predictions, dtype=np.int64), np.asarray(examples["label"]))


class OwnRegressionTask(OwnLabeledTask):
    """A number a row: one output, mean squared error; Pearson, Spearman, MSE."""

    kind: TaskKind = "regression"
    default_metric = "pearson"
    metric_names = ("pearson", "spearman", "mse")
    num_labels = 1

    def parse_label(self, value: Any, place: str, split: str) -> float:
        """The number of one label cell; UserError for anything else."""
        try:
            number = float(value) if not isinstance(value, bool) and value is not None else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise UserError(f"regression label {value!r} is not a number (task.label_column)", place)
        return number

    def label_feature(self) -> Any:
        """Scores as float32, as GLUE's STS-B."""
        import datasets

        return datasets.Value("float32")

    def compute_metrics(self, predictions: Sequence[Any], examples: datasets.Dataset) -> dict[str, float]:
        """Pearson and Spearman in percent, MSE in the labels' units."""
        preds = np.asarray(predictions, dtype=np.float64)
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        return regression_metrics(preds, np.asarray(examples["label"], dtype=np.float64))


class OwnMultilabelTask(ClassesTask):
    """A set of class names a row: a list (JSON, Parquet), or one text cell split at ``task.label_separator``
    (or a JSON list written in the cell). Binary cross-entropy per class; a logit above 0 counts as
    positive; micro-F1, macro-F1, exact match."""

    kind: TaskKind = "multilabel"
    default_metric = "micro_f1"
    metric_names = ("micro_f1", "macro_f1", "exact_match")

    def label_names_in(self, value: Any, place: str) -> list[str]:
        """The class names of one row (none is allowed: a row may have no label)."""
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise UserError(f"labels {value!r}: not a JSON list (task.label_column)", place) from None
        if isinstance(value, str):
            items: list[Any] = value.split(str(self.section.label_separator))
        elif isinstance(value, list | tuple):
            items = list(value)
        elif value is None:
            raise UserError("no labels cell (task.label_column); an empty list or text means none", place)
        else:
            raise UserError(f"labels {value!r}: expected a list of class names (task.label_column)", place)
        names = [label_text(item.strip() if isinstance(item, str) else item) for item in items]
        return [name for name in names if name is not None]

    def parse_label(self, value: Any, place: str, split: str) -> list[float]:
        """The multi-hot row of one label cell."""
        hot = [0.0] * self.num_labels
        for name in self.label_names_in(value, place):
            hot[self._class_id(name, place)] = 1.0
        return hot

    def label_feature(self) -> Any:
        """Multi-hot float rows (binary cross-entropy takes float targets)."""
        import datasets

        return datasets.Sequence(datasets.Value("float32"))

    def compute_metrics(self, predictions: Sequence[Any], examples: datasets.Dataset) -> dict[str, float]:
        """Micro-F1, macro-F1 and exact match in percent, from multi-hot predictions."""
        refs = np.asarray(examples["label"], dtype=np.int64).reshape(len(examples), -1)
        preds = np.asarray(predictions, dtype=np.int64).reshape(len(predictions), -1)
        return multilabel_metrics(preds, refs)


def _named(value: Any, names: list[str] | None, place: str) -> Any:
    """A ClassLabel id (or list of ids) as its class name(s); anything else as it is."""
    if names is None:
        return value
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if not isinstance(i, int) or not 0 <= i < len(names):
            raise UserError(f"label {i!r} is not a class of the dataset ({', '.join(names)})", place)
    named = [names[i] for i in ids]
    return named if isinstance(value, list) else named[0]


def _text(value: Any, key: str, place: str) -> str:
    if value is None:
        raise UserError(f"no text ({key})", place)
    if not isinstance(value, str):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"expected a text in {key}, found {type(value).__name__}", place)
    return value
