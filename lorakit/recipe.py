"""The recipe: one YAML file naming the base model, the task, the LoRA settings and the training setup.

``load_recipe`` reads the file, applies ``--set key.path=value`` overrides and validates the result into
a typed ``Recipe``. Every key has a default and unknown keys are errors. Any problem becomes a single
``UserError`` line that names the file (or the ``--set``) and the dotted key at fault.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from lorakit.errors import UserError
from lorakit.tasks import GENERATION_NAMES, TASK_NAMES

DEFAULT_OUTPUT_DIR = "runs/lorakit"


def _show(value: Any) -> str:
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
            raise ValueError(f"expected {expected} (got {_show(value)})")
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
ModelPath = Annotated[
    str, BeforeValidator(_expand_path), AfterValidator(lambda v: _must_exist(v) if _looks_local(v) else v)
]


class _Section(BaseModel):
    # Numbers are coerced to str so that unquoted YAML such as `output_dir: 2024` still reads as a path.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


class ModelSection(_Section):
    """The base checkpoint: a hub id or a local directory."""

    name_or_path: ModelPath = Field("roberta-base", min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    tokenizer: ModelPath | None = Field(None, min_length=1)  # when it differs from the model


class TaskSection(_Section):
    """The task and where its data comes from (``data_dir``: local original files; null: the hub)."""

    name: str = "mnli"
    data_dir: ExistingDir | None = None
    max_length: Int = Field(128, gt=0)
    max_train_samples: Int | None = Field(None, gt=0)
    max_eval_samples: Int | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _known_task(cls, value: str) -> str:
        name = value.strip().lower()
        if name not in TASK_NAMES:
            raise ValueError(f"unknown task {value!r}; choose one of {', '.join(TASK_NAMES)}")
        return name

    @property
    def is_generation(self) -> bool:
        """Whether the task generates text (E2E, WikiSQL) rather than classifying or regressing."""
        return self.name in GENERATION_NAMES


class LoraSection(_Section):
    """LoRA settings; ignored when ``method`` is ``full``."""

    r: Int = Field(8, gt=0)
    alpha: Float = Field(16.0, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    # None: the architecture's default; a list: module name suffixes; a str: a regex on full names.
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
                    raise ValueError(f"expected module names (got {_show(item)})")
            return list(value)
        raise ValueError(
            f"expected null, a list of module names or a regular expression (got {_show(value)})"
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
            raise ValueError(f"expected 'epoch' or a positive number of steps (got {_show(value)})")
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


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2) and refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            # Compared as written: PyYAML would otherwise keep the last value without a word.
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    problem = f"duplicate key {key_node.value!r}"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where a float needs a dot: `1e-4` would stay a string. Copy the table so
# that SafeLoader itself is left alone.
_Loader.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join((exc.problem or exc.context or "syntax error").split())
        line = f": line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"invalid YAML: {problem}", where=f"{where}{line}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"invalid YAML: {' '.join(str(exc).split())}", where=where) from None


def _read_recipe_file(path: Path) -> dict[str, Any]:
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("recipe file not found", where=where) from None
    except IsADirectoryError:
        raise UserError("is a directory, not a recipe file", where=where) from None
    except (OSError, UnicodeError) as exc:
        raise UserError(f"cannot read the recipe: {exc}", where=where) from None
    data = _parse_yaml(text, where)
    return {} if data is None else dict(_require_mapping(data, where))


def _require_mapping(data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise UserError(f"a recipe is a mapping of sections (model, task, ...), not a {kind}", where=where)
    return data


def _unknown_key(name: str, model: type[BaseModel] | None) -> str:
    close = difflib.get_close_matches(name, list(model.model_fields), n=1) if model else []
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def _section_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _leaves(key: str, value: Any) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for sub, item in value.items() for leaf in _leaves(f"{key}.{sub}", item)]
    return [key]


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> set[str]:
    """Apply ``key.path=value`` items to ``data`` in place; return the dotted keys they set."""
    touched: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError("expected KEY=VALUE, e.g. --set train.lr=1e-4", where=f"--set {item}")
        parts = key.split(".")
        if not key or not all(parts):
            raise UserError(f"invalid key {key!r}", where=f"--set {item}")
        model: type[BaseModel] | None = Recipe
        for depth, part in enumerate(parts):
            if model is None or part not in model.model_fields:
                raise UserError(_unknown_key(part, model), where=f"--set {'.'.join(parts[: depth + 1])}")
            model = _section_of(model.model_fields[part].annotation)
        value = _parse_yaml(raw, f"--set {key}")

        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            # A whole section given inline updates the file's section instead of wiping it.
            node[last] = {**node[last], **value}
        else:
            node[last] = value
        touched.update(_leaves(key, value))
    return touched


def _error_key(error: Mapping[str, Any]) -> tuple[str, type[BaseModel] | None]:
    """The dotted key of a pydantic error, and the section model that holds its last part."""
    key = ""
    model: type[BaseModel] | None = Recipe
    holder: type[BaseModel] | None = Recipe
    loc = error["loc"]
    for i, part in enumerate(loc):
        if error["type"] == "extra_forbidden" and i == len(loc) - 1:
            key = f"{key}.{part}" if key else str(part)
            holder = model
        elif isinstance(part, int):
            key = f"{key}[{part}]" if key else str(part)
            model = None
        elif model is not None and part in model.model_fields:
            key = f"{key}.{part}" if key else part
            model = _section_of(model.model_fields[part].annotation)
        # Anything else is a tag pydantic adds for a union member, not part of the user's key.
    return key, holder


# Pydantic's error types in plain words; the templates are filled from the error's context.
_MESSAGES = {
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "literal_error": "must be one of {expected}",
    **dict.fromkeys(("int_type", "int_parsing", "int_from_float"), "expected an integer"),
    **dict.fromkeys(("float_type", "float_parsing"), "expected a number"),
    "finite_number": "expected a finite number",
    **dict.fromkeys(("bool_type", "bool_parsing"), "expected true or false"),
    "string_type": "expected a string",
    "string_too_short": "must not be empty",
    "list_type": "expected a list",
    **dict.fromkeys(("model_type", "model_attributes_type", "dict_type"), "expected a mapping of keys"),
}


def _error_message(error: Mapping[str, Any], holder: type[BaseModel] | None) -> str:
    kind = error["type"]
    ctx = error.get("ctx", {})
    got = f" (got {_show(error['input'])})"
    if kind == "extra_forbidden":
        return _unknown_key(str(error["loc"][-1]), holder)
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    if kind in _MESSAGES:
        # Bounds of float fields arrive as 0.0 and 1.0; the user wrote 0 and 1.
        tidy = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in ctx.items()}
        return _MESSAGES[kind].format(**tidy) + got
    msg = str(error["msg"])
    return msg[:1].lower() + msg[1:]


def _validate(data: Mapping[str, Any], source: str, touched: Collection[str] = ()) -> Recipe:
    try:
        recipe = Recipe.model_validate(dict(data))
        recipe._source = source
        return recipe
    except ValidationError as exc:
        error = exc.errors()[0]
        key, holder = _error_key(error)
        message = " ".join(_error_message(error, holder).split())
        by_override = any(key == t or key.startswith((f"{t}.", f"{t}[")) for t in touched)
        where = f"--set {key}" if by_override else f"{source}: {key}" if key else source
        raise UserError(message, where=where) from None


def recipe_from_dict(data: Mapping[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate ``data`` (a parsed recipe) into a ``Recipe``; errors name ``source`` and the key."""
    return _validate(_require_mapping(data, source), source)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read the YAML recipe at ``path``, apply ``--set`` style ``key.path=value`` overrides, validate.

    Override values are parsed as YAML, so ``lora.target_modules=[query,value]`` is a list and
    ``train.lr=1e-4`` a float. When the recipe sets no ``output_dir``, it is ``runs/<file stem>``.
    Raises ``UserError`` with one line naming the file (or the ``--set``) and the key at fault.
    """
    path = Path(path)
    data = _read_recipe_file(path)
    data.setdefault("output_dir", f"runs/{path.stem}")
    touched = _apply_overrides(data, overrides)
    return _validate(data, str(path), touched)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved ``recipe`` as YAML that ``load_recipe`` reads back to an equal ``Recipe``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# lorakit recipe, resolved: every key, overrides applied\n" + yaml.safe_dump(
        recipe.model_dump(), sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    # Written aside and renamed, so a crash never leaves a half-written recipe in a run directory.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
