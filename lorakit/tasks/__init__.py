"""Task registry: a recipe's ``task`` section to the object that loads and scores its data.

Built-in tasks are found by ``task.name``, the user's own data by ``task.type``; each entry names the
module and class of its family, imported only when used (``datasets`` and the scorers are slow to load).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lorakit.errors import UserError
from lorakit.tasks.base import Task

if TYPE_CHECKING:
    from lorakit.recipe.schema import TaskSection

GLUE_NAMES = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
GENERATION_NAMES = ("e2e", "wikisql")
TASK_NAMES = GLUE_NAMES + GENERATION_NAMES
USER_TYPES = ("classification", "regression", "multilabel", "generation")

# name (built-in) or type (own data) -> "module:Class"; the class's from_section builds it.
_BUILTIN: dict[str, str] = {
    **dict.fromkeys(GLUE_NAMES, "lorakit.tasks.glue:GlueTask"),
    "e2e": "lorakit.tasks.e2e:E2ETask",
    "wikisql": "lorakit.tasks.wikisql:WikiSQLTask",
}
_OWN_DATA: dict[str, str] = {
    "classification": "lorakit.tasks.own_labeled:OwnClassificationTask",
    "regression": "lorakit.tasks.own_labeled:OwnRegressionTask",
    "multilabel": "lorakit.tasks.own_labeled:OwnMultilabelTask",
    "generation": "lorakit.tasks.own_generation:OwnGenerationTask",
}


def _family(entry: str) -> type[Task]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def build_task(section: TaskSection) -> Task:
    """The task a recipe's ``task`` section describes. Constructing a task reads no data."""
    if section.type is not None:
        return _family(_OWN_DATA[section.type]).from_section(section)
    if section.name not in _BUILTIN:
        raise UserError(f"unknown task {section.name!r}; choose one of {', '.join(TASK_NAMES)}", "task.name")
    return _family(_BUILTIN[section.name]).from_section(section)


def get_task(name: str, data_dir: str | None = None) -> Task:
    """The built-in task called ``name``, reading from ``data_dir`` (original file layout) or the hub."""
    from lorakit.recipe.schema import TaskSection

    if name not in _BUILTIN:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}", where="task.name")
    return build_task(TaskSection.model_construct(name=name, data_dir=data_dir, type=None))
