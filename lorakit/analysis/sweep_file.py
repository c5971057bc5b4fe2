"""The sweep file as written: its schema, reading it, and the checks on its grid (the format is in
``lorakit.analysis.sweep``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorakit.errors import UserError
from lorakit.recipe.schema import show_value


class SweepFile(BaseModel):
    """The sweep file as written (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    recipe: str = Field(min_length=1)
    fixed: dict[str, Any] = Field(default_factory=dict, alias="set")
    grid: dict[str, list[Any]]
    output_dir: str | None = Field(None, min_length=1)
    rows: str | None = None
    cols: str | None = None
    resources: dict[Literal["num_cpus", "num_gpus", "memory"], Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict
    )

    @field_validator("resources")
    @classmethod
    def _whole_gpus(cls, value: dict[str, float]) -> dict[str, float]:
        # Ray's own rule, checked only when a task is submitted, long after the sweep started.
        gpus = value.get("num_gpus", 0.0)
        if gpus > 1 and gpus != int(gpus):
            raise ValueError("num_gpus above 1 is a whole number: a fraction of a GPU is below 1")
        return value


def as_override(key: str, value: Any) -> str:
    # JSON is YAML, and the recipe loader parses override values as YAML: the value comes back as written.
    return f"{key}={json.dumps(value)}"


def linked_keys(key: str) -> list[str]:
    """The recipe keys a grid key sets: ``method,train.lr`` -> ``[method, train.lr]``; a plain key alone."""
    return [part.strip() for part in key.split(",")]


def grid_overrides(key: str, value: Any) -> list[str]:
    """The ``--set`` items one grid value stands for (one per linked key)."""
    parts = linked_keys(key)
    if len(parts) == 1:
        return [as_override(key, value)]
    return [as_override(part, v) for part, v in zip(parts, value, strict=True)]


def read_sweep_file(path: Path) -> SweepFile:
    """The sweep file at ``path``, parsed and schema-checked; a UserError names the file and key."""
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("sweep file not found", where=where) from None
    except IsADirectoryError:
        raise UserError("is a directory, not a sweep file", where=where) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f": line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}", where=where + line) from None
    except (OSError, UnicodeError) as exc:
        raise UserError(f"cannot read the sweep file: {exc}", where=where) from None
    if not isinstance(data, dict):
        raise UserError("a sweep file is a mapping (recipe, set, grid, ...)", where=where)
    try:
        return SweepFile.model_validate(data)
    except ValidationError as exc:
        # An unknown key first: `grids:` is a misspelt grid, better told than "grid: missing".
        error = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        key = ".".join(str(part) for part in error["loc"] if part != "[key]")  # pydantic's: a bad dict key
        messages = {
            "extra_forbidden": "unknown key (expected recipe, set, grid, output_dir, rows, cols, resources)",
            "missing": "missing",
            "list_type": "expected a list of values",
            "dict_type": "expected a mapping of dotted recipe keys",
            "string_type": "expected a string",
            "string_too_short": "must not be empty",
        }
        message = messages.get(error["type"], str(error["msg"]).removeprefix("Value error, "))
        if error["type"] not in ("missing", "extra_forbidden"):
            message += f" (got {show_value(error['input'])})"
        raise UserError(message, where=f"{where}: {key}") from None


def check_grid(spec: SweepFile, where: str, cli_set: list[str]) -> None:
    """The grid's own rules: non-empty lists of distinct values, linked keys well formed, each recipe key
    swept once and never also fixed (``set:`` or ``--set``), output_dir the sweep's."""
    if not spec.grid:
        raise UserError("empty: give at least one recipe key with a list of values", where=f"{where}: grid")
    swept = [part for key in spec.grid for part in linked_keys(key)]
    for key, values in spec.grid.items():
        if not values:
            raise UserError("empty list of values", where=f"{where}: grid.{key}")
        parts = linked_keys(key)
        if len(parts) > 1:
            _check_linked(key, parts, values, where)
        for part in parts:
            if swept.count(part) > 1:
                raise UserError(
                    f"{part} is swept twice; a key is in one grid entry", where=f"{where}: grid.{key}"
                )
        dumped = [json.dumps(v, sort_keys=True) for v in values]
        for i, text in enumerate(dumped):
            if text in dumped[:i]:
                raise UserError(f"value {show_value(values[i])} appears twice", where=f"{where}: grid.{key}")
        if "output_dir" in parts:
            raise UserError(
                "set by the sweep for each point; use the sweep's output_dir", f"{where}: grid.{key}"
            )
        for part in parts:
            if part in spec.fixed:
                raise UserError(
                    "also in grid; a key is fixed or swept, not both", where=f"{where}: set.{part}"
                )
    if "output_dir" in spec.fixed:
        raise UserError("use the sweep's own output_dir: key", where=f"{where}: set.output_dir")
    for item in cli_set:
        key = item.partition("=")[0].strip()
        if key in swept or key == "output_dir":
            raise UserError(f"{key} is swept or set by the sweep", where=f"--set {key}")


def _check_linked(key: str, parts: list[str], values: list[Any], where: str) -> None:
    """Linked keys: named once each, and every value a list with one entry per key."""
    if any(not part for part in parts) or len(set(parts)) != len(parts):
        raise UserError("linked keys are distinct recipe keys joined by commas", where=f"{where}: grid.{key}")
    for value in values:
        if not isinstance(value, list) or len(value) != len(parts):
            raise UserError(
                f"each value is a list of {len(parts)} ({', '.join(parts)}); got {show_value(value)}",
                where=f"{where}: grid.{key}",
            )
