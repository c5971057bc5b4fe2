"""The recipe's ``task`` section: a built-in task by name, or the user's own data by type, with the checks
that keep the two apart."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lorakit.recipe.fields import ExistingDir, Float, Int, KeyedValueError, PathStr, _Section
from lorakit.tasks import GENERATION_NAMES, TASK_NAMES

TaskType = Literal["classification", "regression", "multilabel", "generation"]

# Keys that describe the user's own data (``task.type``); a built-in task (``task.name``) takes none of them.
_USER_KEYS = (
    "train_file",
    "validation_file",
    "test_file",
    "validation_split",
    "dataset",
    "dataset_config",
    "splits",
    "text_column",
    "text_pair_column",
    "label_column",
    "labels",
    "label_separator",
    "prompt_column",
    "completion_column",
    "messages_column",
    "metric",
)
_LABELED = ("classification", "regression", "multilabel")
# Keys of one family of user tasks that the other family has no use for.
_LABELED_ONLY = ("text_column", "text_pair_column", "label_column", "labels", "label_separator")
_GENERATION_ONLY = ("prompt_column", "completion_column", "messages_column")


class TaskSection(_Section):
    """The task: a built-in one (``name``: a GLUE task, E2E, WikiSQL; ``data_dir``: local original files,
    null: the hub) or the user's own data (``type`` with files or a dataset and its columns)."""

    name: str | None = None  # a built-in task; mnli when neither name nor type is given
    type: TaskType | None = None  # the user's own data: classification | regression | multilabel | generation
    data_dir: ExistingDir | None = None
    # The user's data: files (format from the extension), or a hub dataset id / local dataset folder.
    # Paths are checked when the data is read, not here: a trained run whose data moved still merges.
    train_file: PathStr | None = Field(None, min_length=1)
    validation_file: PathStr | None = Field(None, min_length=1)
    test_file: PathStr | None = Field(None, min_length=1)
    validation_split: Float | None = Field(None, gt=0, lt=1)  # held out of train when there is no validation
    split_seed: Int = Field(0, ge=0)  # which rows validation_split holds out, the same for every train.seed
    dataset: PathStr | None = Field(None, min_length=1)
    dataset_config: str | None = None
    # Split names of `dataset`, {train, validation, test}; null: those names, validation held out of train
    # (validation_split) when the dataset has none.
    splits: dict[str, str] | None = None
    text_column: str | None = Field(None, min_length=1)
    text_pair_column: str | None = Field(None, min_length=1)
    label_column: str | None = Field(None, min_length=1)
    labels: list[str] | None = None  # class names in id order; null: the sorted distinct labels of train
    label_separator: str | None = Field(None, min_length=1)  # multilabel labels written as one text cell
    prompt_column: str | None = Field(None, min_length=1)
    completion_column: str | None = Field(None, min_length=1)
    messages_column: str | None = Field(None, min_length=1)
    metric: str | None = Field(None, min_length=1)  # the metric that keeps the best adapter
    max_length: Int = Field(128, gt=0)
    max_train_samples: Int | None = Field(None, gt=0)
    max_eval_samples: Int | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _known_task(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip().lower()
        if name not in TASK_NAMES:
            raise ValueError(
                f"unknown task {value!r}; choose one of {', '.join(TASK_NAMES)}, or set task.type for "
                "your own data"
            )
        return name

    @field_validator("splits")
    @classmethod
    def _split_roles(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            unknown = sorted(set(value) - {"train", "validation", "test"})
            if unknown:
                raise ValueError(f"unknown split role {unknown[0]!r}; use train, validation, test")
            if "train" not in value:
                raise ValueError("name the train split (splits: {train: ...})")
        return value

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("must not be empty (null: the sorted distinct labels of train)")
            repeated = sorted({v for v in value if value.count(v) > 1})
            if repeated:
                raise ValueError(f"label {repeated[0]!r} is listed twice")
        return value

    @model_validator(mode="after")
    def _builtin_or_own_data(self) -> TaskSection:
        if self.type is None:
            # A built-in task: the user-data keys have no meaning (set on a GLUE task, they would be ignored).
            for key in _USER_KEYS:
                if getattr(self, key) is not None:
                    raise KeyedValueError(key, "describes your own data; set task.type too (or drop it)")
            if self.name is None:
                self.name = "mnli"
            return self
        if self.name is not None:
            raise KeyedValueError(
                "name", f"a built-in task; with task.type ({self.type}) leave task.name out"
            )
        if self.data_dir is not None:
            raise KeyedValueError("data_dir", "is for built-in tasks; your own data is train_file or dataset")
        if (self.train_file is None) == (self.dataset is None):
            raise KeyedValueError(
                "train_file", "your own data needs either train_file or dataset (one of them)"
            )
        if self.dataset is None and self.splits is not None:
            raise KeyedValueError("splits", "names the splits of task.dataset; with files, use *_file keys")
        if self.dataset is not None:
            for key in ("validation_file", "test_file"):
                if getattr(self, key) is not None:
                    raise KeyedValueError(key, "with task.dataset, name its splits in task.splits")
        if self.validation_file is not None and self.validation_split is not None:
            raise KeyedValueError(
                "validation_split", "holds out part of train when there is no validation_file"
            )
        if self.dataset is None and self.validation_file is None and self.validation_split is None:
            self.validation_split = 0.1  # a dataset's default waits until its splits are known
        unused = _GENERATION_ONLY if self.type in _LABELED else _LABELED_ONLY
        for key in unused:
            if getattr(self, key) is not None:
                raise KeyedValueError(key, f"not used by {self.type} tasks")
        if self.type != "multilabel" and self.label_separator is not None:
            raise KeyedValueError("label_separator", "only multilabel tasks take several labels a row")
        if self.type == "regression" and self.labels is not None:
            raise KeyedValueError("labels", "regression has no classes (its labels are numbers)")
        # The defaults of the user's keys are filled in here, not on the fields, so that a built-in task's
        # resolved recipe carries none of them.
        if self.type in _LABELED:
            self.text_column = self.text_column or "text"
            self.label_column = self.label_column or "label"
            if self.type == "multilabel":
                self.label_separator = self.label_separator or ","
        elif self.messages_column is not None:
            for key in ("prompt_column", "completion_column"):
                if getattr(self, key) is not None:
                    raise KeyedValueError(
                        key, "chat rows come from messages_column; drop prompt/completion columns"
                    )
        else:
            self.prompt_column = self.prompt_column or "prompt"
            self.completion_column = self.completion_column or "completion"
        return self

    def as_written(self) -> dict[str, Any]:
        """The keys that apply to this task, as a resolved recipe file writes them: a built-in task without
        the own-data keys, the user's data without ``name`` and ``data_dir`` and without unset keys."""
        data = self.model_dump()
        if self.type is None:
            return {k: v for k, v in data.items() if k not in _USER_KEYS and k not in ("type", "split_seed")}
        return {k: v for k, v in data.items() if k not in ("name", "data_dir") and v is not None}

    @property
    def is_generation(self) -> bool:
        """Whether the task generates text (E2E, WikiSQL, own generation data) rather than classifying."""
        return self.type == "generation" or self.name in GENERATION_NAMES

    @property
    def is_own_data(self) -> bool:
        """Whether the task is the user's own data (``task.type``) rather than a built-in task."""
        return self.type is not None
