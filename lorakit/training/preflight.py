"""What is checked before training starts, once, wherever it starts: by ``lorakit train`` before it
launches several processes (so a bad setting is told once, not once per process), and by every training
process itself (the Python API and launched processes alike).

* the run directory: free for a new run, or holding a checkpoint to resume;
* the precision: fp16 autocast needs a GPU;
* the launcher: processes that a launcher started must be joined up by Accelerate;
* the recipe as the run records it: local paths absolute, the classes of the user's data written in.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lorakit.errors import UserError
from lorakit.recipe import Recipe, with_resolved_paths
from lorakit.runs import METRICS_FILE, RECIPE_FILE
from lorakit.tasks import build_task
from lorakit.tasks.base import Task
from lorakit.training.checkpoint import latest_checkpoint

logger = logging.getLogger(__name__)

# Set by torchrun, DeepSpeed's and MPI's launchers, and (ACCELERATE_DYNAMO_BACKEND) by every
# `accelerate launch`, one process or many.
_LAUNCHER_VARIABLES = (
    "LOCAL_RANK",
    "WORLD_SIZE",
    "PMI_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "MV2_COMM_WORLD_SIZE",
    "ACCELERATE_DYNAMO_BACKEND",
)
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def inside_launched_process() -> bool:
    """Whether this process was started by a launcher (accelerate launch, torchrun, mpirun)."""
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)


def launched_world_size() -> int:
    """The number of processes the launcher started (1 when none did)."""
    for name in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def check_precision(recipe: Recipe, device_type: str) -> None:
    """fp16 mixed precision on a device without CUDA: Accelerate would quietly train in float32."""
    if recipe.train.mixed_precision == "fp16" and device_type != "cuda":
        raise UserError(
            "fp16 mixed precision needs a GPU: on the CPU Accelerate would silently train in float32; "
            "use bf16 or no",
            recipe.where("train.mixed_precision"),
        )


def _failed_start(run_dir: Path) -> bool:
    """A run directory that holds only what a start writes before training (the recipe, the logs; no
    checkpoint, no adapter, no metrics): a start that failed (the hub unreachable, say), which must not
    block the retry. Only lorakit's own names count: a folder of the user's is never taken for one."""
    if {p.name for p in run_dir.iterdir()} != {RECIPE_FILE, "logs"} or not (run_dir / "logs").is_dir():
        return False
    # Trackers that keep files in the run (W&B's offline folder) may have started before the failure.
    return {p.name for p in (run_dir / "logs").iterdir()} <= {"tensorboard", "wandb", "train.jsonl"}


def run_dir_for(recipe: Recipe, resume: bool) -> Path:
    """The run directory of ``recipe``; a UserError when resuming finds no checkpoint there, or a fresh
    run finds another run there."""
    run_dir = Path(recipe.output_dir)
    if resume:
        if latest_checkpoint(run_dir) is None and not _unfinished(run_dir):
            raise UserError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}", where="--resume")
    elif run_dir.exists() and any(run_dir.iterdir()) and not _failed_start(run_dir):
        raise UserError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --output-dir",
            where=recipe.where("output_dir"),
        )
    return run_dir


def _unfinished(run_dir: Path) -> bool:
    """A lorakit run that stopped before its first checkpoint (a full disk at the first save, say):
    ``--resume`` starts it again from step 0 rather than leaving no way on but deleting it."""
    return (run_dir / RECIPE_FILE).is_file() and not (run_dir / METRICS_FILE).exists()


def check_process_count(recipe: Recipe, num_processes: int) -> None:
    """Fail clearly when a launcher started several processes that Accelerate does not join up (torchrun
    on a machine without a GPU and without ``ACCELERATE_USE_CPU=true``): each would train alone and all
    would write the same run directory."""
    launched = launched_world_size()
    if launched > 1 and num_processes == 1:
        raise UserError(
            f"started as {launched} processes but Accelerate sees one; without a GPU set "
            "ACCELERATE_USE_CPU=true, or let `lorakit train --num-processes N` launch them",
            recipe.where("train.num_processes"),
        )
    if recipe.train.num_processes not in (1, num_processes):
        logger.warning(
            "train.num_processes is %d but the launcher started %d processes; training on %d",
            recipe.train.num_processes,
            num_processes,
            num_processes,
        )


def settled_recipe(recipe: Recipe) -> tuple[Recipe, Task]:
    """The recipe as the run records it, and its task: local paths absolute (the run works from any
    folder), and class names read from the training data written in (``task.labels``), so that eval,
    merge, predict and serve know them without the data."""
    recipe = with_resolved_paths(recipe)
    task = build_task(recipe.task)
    if recipe.task.is_own_data and recipe.task.labels is None and task.label_names:
        section = recipe.task.model_copy(update={"labels": list(task.label_names)})
        recipe = recipe.model_copy(update={"task": section})
    return recipe, task
