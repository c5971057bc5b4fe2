"""Task registry: a task name from a recipe to the object that loads and scores its data."""

from __future__ import annotations

from lorakit.errors import UserError
from lorakit.tasks.base import Task

GLUE_NAMES = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
GENERATION_NAMES = ("e2e", "wikisql")
TASK_NAMES = GLUE_NAMES + GENERATION_NAMES


def get_task(name: str, data_dir: str | None = None) -> Task:
    """The task called ``name``, reading from ``data_dir`` (original file layout) or, when None, the hub."""
    if name in GLUE_NAMES:
        from lorakit.tasks.glue import GlueTask

        return GlueTask(name, data_dir)
    if name == "e2e":
        from lorakit.tasks.e2e import E2ETask

        return E2ETask(data_dir)
    if name == "wikisql":
        from lorakit.tasks.wikisql import WikiSQLTask

        return WikiSQLTask(data_dir)
    raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}", where="task.name")
