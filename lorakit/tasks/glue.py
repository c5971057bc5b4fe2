"""The eight GLUE tasks: rows from the hub (``nyu-mll/glue``) or GLUE's original files, and their metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # datasets, scipy and scikit-learn are imported where used: `lorakit info` needs none
    import datasets

    from lorakit.recipe.schema import TaskSection

from lorakit.errors import UserError
from lorakit.tasks.base import Task, TaskKind
from lorakit.tasks.metrics import correlation, mcc

logger = logging.getLogger(__name__)

HUB_ID = "nyu-mll/glue"


@dataclass(frozen=True)
class _Spec:
    """Where one GLUE task's fields live, on the hub and in GLUE's TSV files."""

    folder: str  # GLUE's folder name, e.g. "SST-2"
    hub_columns: tuple[str, str | None]  # hub columns holding text_a, text_b
    tsv_columns: tuple[str, str | None, str] | None  # TSV header names of text_a, text_b, label
    label_names: tuple[str, ...] | None  # hub ClassLabel order; None for regression
    main_metric: str


_SPECS: dict[str, _Spec] = {
    # CoLA's TSVs have no header; _read_cola_tsv reads columns by position instead.
    "cola": _Spec("CoLA", ("sentence", None), None, ("unacceptable", "acceptable"), "matthews_correlation"),
    "sst2": _Spec(
        "SST-2", ("sentence", None), ("sentence", None, "label"), ("negative", "positive"), "accuracy"
    ),
    "mrpc": _Spec(
        "MRPC",
        ("sentence1", "sentence2"),
        ("#1 String", "#2 String", "Quality"),
        ("not_equivalent", "equivalent"),
        "accuracy",
    ),
    "stsb": _Spec("STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2", "score"), None, "pearson"),
    "qqp": _Spec(
        "QQP",
        ("question1", "question2"),
        ("question1", "question2", "is_duplicate"),
        ("not_duplicate", "duplicate"),
        "accuracy",
    ),
    "mnli": _Spec(
        "MNLI",
        ("premise", "hypothesis"),
        ("sentence1", "sentence2", "gold_label"),
        ("entailment", "neutral", "contradiction"),
        "matched_accuracy",
    ),
    "qnli": _Spec(
        "QNLI",
        ("question", "sentence"),
        ("question", "sentence", "label"),
        ("entailment", "not_entailment"),
        "accuracy",
    ),
    "rte": _Spec(
        "RTE",
        ("sentence1", "sentence2"),
        ("sentence1", "sentence2", "label"),
        ("entailment", "not_entailment"),
        "accuracy",
    ),
}

# split -> candidate file names, first found wins.
_FILES: dict[str, tuple[str, ...]] = {"train": ("train.tsv",), "validation": ("dev.tsv",)}
_MNLI_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.tsv", "train.jsonl"),
    "validation_matched": ("dev_matched.tsv", "dev_matched.jsonl"),
    "validation_mismatched": ("dev_mismatched.tsv", "dev_mismatched.jsonl"),
}


class GlueTask(Task):
    """One GLUE task (cola sst2 mrpc stsb qqp mnli qnli rte) bound to the hub or to a local folder.

    Rows have ``text_a``, ``text_b`` (``None`` for CoLA and SST-2), ``label`` (class id in the hub's
    ``nyu-mll/glue`` order, or the float similarity score for STS-B) and ``idx`` (the row's position in
    the source file, as the hub numbers it).

    ``data_dir`` is GLUE's folder for the task (e.g. ``glue_data/MRPC``) holding ``train.tsv`` and
    ``dev.tsv`` (MNLI: ``dev_matched.tsv``/``dev_mismatched.tsv``, or the ``premise``/``hypothesis``/
    ``label`` JSONL export of them); the parent folder holding GLUE's task folders works too.

    ``compute_metrics`` returns plain keys (``accuracy``, ``f1``, ``matthews_correlation``, ``pearson``,
    ``spearman``), in percent. The evaluation layer prefixes them with the ``eval_splits`` prefix and an
    underscore when the prefix is non-empty, so MNLI's ``main_metric`` is ``matched_accuracy`` while every
    other task's is a plain name.
    """

    def __init__(self, name: str, data_dir: str | None = None) -> None:
        if name not in _SPECS:
            raise UserError(
                f"unknown GLUE task {name!r}; choose one of {', '.join(_SPECS)}", where="task.name"
            )
        super().__init__(data_dir)
        self.name = name
        self._spec = _SPECS[name]
        self.kind: TaskKind = "regression" if name == "stsb" else "classification"
        self.num_labels = {"stsb": 1, "mnli": 3}.get(name, 2)
        self.label_names: list[str] | None = list(self._spec.label_names) if self._spec.label_names else None
        self.main_metric = self._spec.main_metric
        if name == "mnli":
            self.eval_splits = {"matched": "validation_matched", "mismatched": "validation_mismatched"}
        else:
            self.eval_splits = {"": "validation"}
        import datasets

        self.features = datasets.Features(
            {
                "text_a": datasets.Value("string"),
                "text_b": datasets.Value("string"),
                # float32 scores and int32 idx as on the hub, so both sources give identical rows.
                "label": datasets.Value("float32" if self.kind == "regression" else "int64"),
                "idx": datasets.Value("int32"),
            }
        )

    @classmethod
    def from_section(cls, section: TaskSection) -> GlueTask:
        """The GLUE task ``task.name``, reading ``task.data_dir`` or the hub."""
        return cls(str(section.name), section.data_dir)

    @property
    def splits(self) -> list[str]:
        """The split names ``load`` accepts."""
        return list(_MNLI_FILES if self.name == "mnli" else _FILES)

    def load(self, split: str) -> datasets.Dataset:
        """Rows of ``split`` from ``data_dir`` (GLUE's files) or, when it is None, from the hub."""
        self.check_split(split)
        if self.data_dir is None:
            return self._load_hub(split)
        path = self._find_file(split)
        if path.suffix == ".jsonl":
            columns = self._read_jsonl(path)
        elif self.name == "cola":
            columns = self._read_cola_tsv(path)
        else:
            columns = self._read_tsv(path)
        import datasets

        return datasets.Dataset.from_dict(columns, features=self.features)

    def source_of(self, split: str) -> str:
        """The file ``split`` is read from, or the hub dataset."""
        return str(self._find_file(split)) if self.data_dir else f"{HUB_ID}/{self.name} ({split})"

    def compute_metrics(self, predictions: Sequence[Any], examples: datasets.Dataset) -> dict[str, float]:
        """Paper metrics in percent: CoLA MCC; MRPC/QQP accuracy and F1; STS-B Pearson and Spearman;
        accuracy elsewhere. ``predictions`` are class ids (floats for STS-B), one per row of ``examples``."""
        preds = np.asarray(predictions)
        refs = np.asarray(examples["label"])
        if self.kind == "regression" and preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]  # a regression head's (N, 1) output
        if preds.shape != refs.shape:
            raise ValueError(f"{preds.shape[0] if preds.ndim else 0} predictions for {len(refs)} examples")
        if self.kind == "regression":
            return {
                "pearson": correlation("pearsonr", preds, refs),
                "spearman": correlation("spearmanr", preds, refs),
            }
        preds = preds.astype(np.int64)
        refs = refs.astype(np.int64)
        if self.name == "cola":
            return {"matthews_correlation": mcc(preds, refs)}
        result = {"accuracy": 100.0 * float(np.mean(preds == refs)) if len(refs) else 0.0}
        if self.name in ("mrpc", "qqp"):
            from sklearn.metrics import f1_score

            result["f1"] = 100.0 * float(f1_score(refs, preds, pos_label=1, zero_division=0.0))
        return result

    # -- sources -------------------------------------------------------------------------------------

    def _load_hub(self, split: str) -> datasets.Dataset:
        import datasets

        raw = datasets.load_dataset(HUB_ID, self.name, split=split)
        col_a, col_b = self._spec.hub_columns

        def to_rows(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            return {
                "text_a": batch[col_a],
                "text_b": batch[col_b] if col_b else [None] * len(batch[col_a]),
                "label": batch["label"],
                "idx": batch["idx"],
            }

        return raw.map(to_rows, batched=True, remove_columns=raw.column_names, features=self.features)

    def _find_file(self, split: str) -> Path:
        names = (_MNLI_FILES if self.name == "mnli" else _FILES)[split]
        root = Path(self.data_dir or ".")
        folders = [root, root / self._spec.folder]
        for folder in folders:
            for file_name in names:
                if (folder / file_name).is_file():
                    return folder / file_name
        looked = " or ".join(str(root / n) for n in names)
        raise UserError(f"no {split} file for {self.name}: {looked} not found", where="task.data_dir")

    def _parse_label(self, raw: str | int | float, where: str) -> int | float:
        try:
            if self.kind == "regression":
                return float(raw)
            if self.label_names and raw in self.label_names:
                return self.label_names.index(str(raw))
            label = int(raw)
        except (TypeError, ValueError):
            label = -1
        if self.kind == "regression" or not 0 <= label < self.num_labels:
            expected = (
                "a number" if self.kind == "regression" else f"one of {', '.join(self.label_names or [])}"
            )
            raise UserError(f"bad label {raw!r} for {self.name}; expected {expected}", where)
        return label

    def _read_cola_tsv(self, path: Path) -> dict[str, list[Any]]:
        # GLUE's CoLA train/dev have no header: source, label, original mark, sentence.
        columns: dict[str, list[Any]] = {"text_a": [], "text_b": [], "label": [], "idx": []}
        for n, (lineno, fields) in enumerate(_tsv_lines(path)):
            if len(fields) < 4:
                raise UserError(f"expected 4 tab-separated fields, found {len(fields)}", f"{path}:{lineno}")
            columns["text_a"].append(fields[3])
            columns["text_b"].append(None)
            columns["label"].append(self._parse_label(fields[1], f"{path}:{lineno}"))
            columns["idx"].append(n)
        return columns

    def _read_tsv(self, path: Path) -> dict[str, list[Any]]:
        lines = _tsv_lines(path)
        header_line = next(lines, None)
        if header_line is None:
            raise UserError("empty file; expected a GLUE TSV with a header row", str(path))
        header = header_line[1]
        assert self._spec.tsv_columns is not None  # CoLA, the one headerless task, has its own reader
        positions = []
        for column in self._spec.tsv_columns:
            if column is None:
                positions.append(None)
            elif column in header:
                positions.append(header.index(column))
            else:
                raise UserError(f"no column {column!r} in the header ({', '.join(header)})", str(path))
        pos_a, pos_b, pos_label = positions
        needed = max(p for p in positions if p is not None) + 1
        columns: dict[str, list[Any]] = {"text_a": [], "text_b": [], "label": [], "idx": []}
        skipped = 0
        # idx counts every data row, skipped ones too, as the hub's loader numbers them.
        for n, (lineno, fields) in enumerate(lines):
            where = f"{path}:{lineno}"
            malformed = len(fields) < needed or fields[pos_label] == ""
            if malformed and self.name == "qqp":
                # GLUE's QQP train.tsv has a few questions broken over two lines by an embedded newline
                # (nyu-mll/GLUE-baselines#5); the hub's loader drops the short rows this leaves (and any
                # row without a label), and so do we. No other official GLUE file has such rows, so
                # elsewhere they are errors.
                skipped += 1
                continue
            if len(fields) < needed:
                raise UserError(f"expected {len(header)} tab-separated fields, found {len(fields)}", where)
            columns["text_a"].append(fields[pos_a])
            columns["text_b"].append(fields[pos_b] if pos_b is not None else None)
            columns["label"].append(self._parse_label(fields[pos_label], where))
            columns["idx"].append(n)
        if skipped:
            logger.info("%s: skipped %d malformed rows, as the hub's GLUE loader does", path, skipped)
        return columns

    def _read_jsonl(self, path: Path) -> dict[str, list[Any]]:
        # The premise/hypothesis/label export of MNLI (labels as names); only MNLI offers .jsonl files.
        columns: dict[str, list[Any]] = {"text_a": [], "text_b": [], "label": [], "idx": []}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                    premise, hypothesis, raw = record["premise"], record["hypothesis"], record["label"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise UserError(
                        f"expected a JSON object with premise, hypothesis, label ({err})", where
                    ) from err
                columns["text_a"].append(premise)
                columns["text_b"].append(hypothesis)
                columns["label"].append(self._parse_label(raw, where))
                columns["idx"].append(len(columns["idx"]))
        return columns


def _tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each non-blank line, split on tabs only.

    GLUE's files are not CSV-quoted (sentences hold bare ``"``), so no quoting rules apply. The file is
    read in binary so that only ``\\n`` ends a row: text mode would also split at a stray ``\\r``.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # MRPC's header starts with a UTF-8 BOM
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise UserError(f"not UTF-8 text ({err})", f"{path}:{lineno}") from err
            if line:
                yield lineno, line.split("\t")
