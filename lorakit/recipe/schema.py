"""The recipe schema: every key of a recipe, its type, default and allowed range (pydantic models).

The field types are ``lorakit.recipe.fields``'; the task section is ``lorakit.recipe.task_schema``. Reading
YAML, overrides and the one-line error messages live in ``lorakit.recipe.loading``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from lorakit.recipe.fields import (  # re-exported: other modules import them from here
    PACKAGE_SCHEME,
    ExistingDir,
    ExistingFile,
    Float,
    Int,
    KeyedValueError,
    ModelPath,
    PathStr,
    _looks_local,
    _Section,
    show_value,
)
from lorakit.recipe.task_schema import TaskSection, TaskType

__all__ = [
    "PACKAGE_SCHEME",
    "GenerationSection",
    "KeyedValueError",
    "LoraSection",
    "ModelSection",
    "Recipe",
    "TaskSection",
    "TRACKERS",
    "TaskType",
    "TrainSection",
    "_looks_local",
    "show_value",
]

DEFAULT_OUTPUT_DIR = "runs/lorakit"
# train.report_to: Accelerate's experiment trackers, by the names it gives them.
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


class ModelSection(_Section):
    """The base checkpoint: a hub id or a local directory."""

    name_or_path: ModelPath = Field("roberta-base", min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    tokenizer: ModelPath | None = Field(None, min_length=1)  # when it differs from the model
    # The transformer blocks' linear layers stored quantized and frozen (QLoRA; ``lorakit.quantization``):
    # nf4 (torchao, the `quant` extra) or int8 (per-row absmax); embeddings, norms and the head stay dense.
    quantize: Literal["none", "nf4", "int8"] = "none"


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
    # Several machines (docs/distributed.md): num_processes counts the processes on all of them, as
    # Accelerate's does; each machine runs `lorakit train` with its own machine_rank (0: the main one).
    num_machines: Int = Field(1, ge=1)
    machine_rank: Int = Field(0, ge=0)
    main_process_ip: str | None = None  # the main machine's address, as the others reach it
    main_process_port: Int | None = Field(None, ge=1, le=65535)  # null: 29500
    rdzv_timeout: Int = Field(300, gt=0)  # seconds a machine waits for the others before failing
    # Experiment trackers (Accelerate's, by name) that get the recipe, every logged metric and the final ones;
    # `none` (or []) for none. The JSON-lines log is always written.
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"])

    @model_validator(mode="after")
    def _machines(self) -> TrainSection:
        # With an Accelerate file the machine count may be the file's: launch.machines checks the two.
        own_count = self.distributed is None or "num_machines" in self.model_fields_set
        if own_count and self.machine_rank >= self.num_machines:
            raise KeyedValueError(
                "machine_rank", f"must be below num_machines ({self.num_machines}); got {self.machine_rank}"
            )
        if self.num_machines > 1:
            if not self.main_process_ip:
                raise KeyedValueError(
                    "main_process_ip", "is needed with several machines: the main one's address"
                )
            if (
                self.num_processes > 1 or self.distributed is None
            ) and self.num_processes % self.num_machines:
                raise KeyedValueError(
                    "num_processes",
                    f"counts the processes on all {self.num_machines} machines: a multiple of "
                    f"{self.num_machines} (got {self.num_processes})",
                )
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _unquoted_no(cls, value: Any) -> Any:
        # An unquoted `no` in YAML 1.1 is the boolean false.
        return "no" if value is False else value

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"expected tracker names or none (got {show_value(value)})")
        names = [n.strip().lower() for n in names]
        if "none" in names:
            if len(names) > 1:
                raise ValueError("`none` cannot be combined with trackers")
            return []
        for name in names:
            if name not in TRACKERS:
                raise ValueError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)} or none")
        return list(dict.fromkeys(names))

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
