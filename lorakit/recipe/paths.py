"""A recipe whose local paths are absolute, so that a run's ``recipe.yaml`` (and the adapter's base model
path written from it) works from any folder, not only the one it was trained in.

Hub ids stay as written: ``roberta-base`` or ``org/name`` (model) and ``glue`` (dataset) are names, not
paths, unless a folder of that name exists here, which is then what transformers or datasets would load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lorakit.recipe.schema import Recipe, _looks_local

# Keys that are always local paths, per section. The task's own-data file keys are read with getattr:
# a recipe schema without them has nothing to resolve there.
_PATH_KEYS = {
    "task": ("data_dir", "train_file", "validation_file", "test_file"),
    "lora": ("init_from",),
    "train": ("distributed",),
}
# Keys that hold either a local path or a hub id.
_PATH_OR_ID_KEYS = {"model": ("name_or_path", "tokenizer"), "task": ("dataset",)}


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):  # a name no filesystem takes (too long, a NUL) is not a local path
        return False


def _resolved_section(section: BaseModel, section_name: str) -> BaseModel:
    """``section`` with its path keys made absolute (a copy), or ``section`` itself when none changes."""
    update: dict[str, Any] = {}
    for key in _PATH_KEYS.get(section_name, ()):
        value = getattr(section, key, None)
        if isinstance(value, str):
            update[key] = _absolute(value)
    for key in _PATH_OR_ID_KEYS.get(section_name, ()):
        value = getattr(section, key, None)
        # A model name that looks local is a path even before it exists; a dataset is a path only when
        # it is one on disk (a hub id such as `imdb` or `org/name` cannot be told apart otherwise).
        looks_local = section_name == "model" and isinstance(value, str) and _looks_local(value)
        if isinstance(value, str) and (looks_local or _exists(value)):
            update[key] = _absolute(value)
    update = {key: value for key, value in update.items() if value != getattr(section, key)}
    return section.model_copy(update=update) if update else section


def with_resolved_paths(recipe: Recipe) -> Recipe:
    """A copy of ``recipe`` in which every local path is absolute (``~`` expanded, symlinks resolved).

    Resolved: ``model.name_or_path`` and ``model.tokenizer`` when they exist on disk or look local
    (``./``, ``../``, ``/``, ``~``, or more than one slash); ``task.data_dir``, ``task.train_file``,
    ``task.validation_file``, ``task.test_file``; ``task.dataset`` only when it exists on disk;
    ``lora.init_from``; ``train.distributed``; ``output_dir``. Hub ids and None stay as they are. The
    copy keeps the recipe's source, so errors about it still name its file.
    """
    update: dict[str, Any] = {}
    for name in ("model", "task", "lora", "train"):
        section = getattr(recipe, name)
        resolved = _resolved_section(section, name)
        if resolved is not section:
            update[name] = resolved
    output_dir = _absolute(recipe.output_dir)
    if output_dir != recipe.output_dir:
        update["output_dir"] = output_dir
    # model_copy, not a new Recipe: validation would check every path again, and the source would be lost.
    return recipe.model_copy(update=update)
