"""Reading a recipe: one YAML file naming the base model, the task, the LoRA settings and the training setup.

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
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lorakit.errors import UserError
from lorakit.recipe.schema import KeyedValueError, Recipe, show_value


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
    got = f" (got {show_value(error['input'])})"
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
        keyed = error.get("ctx", {}).get("error")
        if isinstance(keyed, KeyedValueError):  # a check across keys names the key it is about
            key = f"{key}.{keyed.key}" if key else keyed.key
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
    data = {**recipe.model_dump(), "task": recipe.task.as_written()}
    text = "# lorakit recipe, resolved: every key, overrides applied\n" + yaml.safe_dump(
        data, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    # Written aside and renamed, so a crash never leaves a half-written recipe in a run directory.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Keys that matter to training only and that validation checks on disk (a starting adapter, an Accelerate
# config): a trained run whose files have moved since is still read for its weights.
_TRAINING_ONLY = ("lora.init_from=null", "train.distributed=null")
# A built-in task's data folder, also checked on disk; only training and evaluation read it. (The own-data
# file keys are checked when the data is read, so they need no dropping.)
_DATA_DIR = "task.data_dir=null"


def load_trained_recipe(path: str | Path, overrides: Sequence[str] = (), keep_data: bool = False) -> Recipe:
    """The recipe of a trained run, for using its adapter: training's own paths (``lora.init_from``,
    ``train.distributed``) are dropped, so a starting adapter or a config that has moved since does not
    stop it.

    ``keep_data=False`` (merge, predict, serve, generate, analyze) drops the task's data too; ``True``
    (eval) keeps and checks it. ``overrides`` (``--set``) apply after the drops, so that
    ``--set task.data_dir=NEW`` points a run at data that has moved.
    """
    drops = _TRAINING_ONLY if keep_data else (*_TRAINING_ONLY, _DATA_DIR)
    return load_recipe(path, [*drops, *overrides])
