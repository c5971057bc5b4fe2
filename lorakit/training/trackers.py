"""Experiment trackers (``train.report_to``): Accelerate's, by name. Each gets the run's recipe as its config,
the loss and learning rate at every log step, the metrics at every evaluation, and the best and final metrics
at the end; with several processes only the main one reports (Accelerate's trackers act there alone).

TensorBoard writes ``RUN_DIR/logs/tensorboard`` as before, W&B its run folder under ``RUN_DIR/logs/wandb``;
MLflow, Comet, Aim, ClearML and DVCLive go where their own settings (environment variables, config files)
send them. The project (W&B project, MLflow experiment) is ``lorakit`` unless those settings name one; the
run is named after the run directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.errors import UserError
from lorakit.recipe import Recipe

PROJECT = "lorakit"


def _available() -> dict[str, tuple[Callable[[], bool], str]]:
    """Each tracker: Accelerate's check that its package is installed, and what installs it (lorakit's extra
    of the tracker's name; TensorBoard is a dependency of lorakit itself)."""
    from accelerate.utils import imports

    return {
        "tensorboard": (imports.is_tensorboard_available, "pip install tensorboard"),
        "wandb": (imports.is_wandb_available, "pip install 'lorakit[wandb]'"),
        "mlflow": (imports.is_mlflow_available, "pip install 'lorakit[mlflow]'"),
        "comet_ml": (imports.is_comet_ml_available, "pip install 'lorakit[comet_ml]'"),
        "aim": (imports.is_aim_available, "pip install 'lorakit[aim]'"),
        "clearml": (imports.is_clearml_available, "pip install 'lorakit[clearml]'"),
        "dvclive": (imports.is_dvclive_available, "pip install 'lorakit[dvclive]'"),
    }


def check_installed(recipe: Recipe) -> None:
    """A UserError (exit 2) naming the extra to install, for the first tracker whose package is missing;
    called before the model or data load."""
    available = _available()
    for name in recipe.train.report_to:
        installed, install = available[name]
        if not installed():
            raise UserError(
                f"the {name} tracker is not installed: {install} (or drop it from train.report_to)",
                recipe.where("train.report_to"),
            )


def log_with(recipe: Recipe, run_dir: Path) -> list[Any] | None:
    """Accelerate's ``log_with``: TensorBoard as a tracker writing ``logs/tensorboard``, the rest by name;
    None for none (an empty list makes Accelerate warn)."""
    trackers: list[Any] = []
    for name in recipe.train.report_to:
        if name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            trackers.append(TensorBoardTracker("tensorboard", run_dir / "logs"))
        else:
            trackers.append(name)
    return trackers or None


def _init_kwargs(run_dir: Path) -> dict[str, dict[str, Any]]:
    name = run_dir.resolve().name
    return {
        "wandb": {"name": name, "dir": str(run_dir / "logs")},
        "mlflow": {"run_name": name},
    }


def start(accelerator: Any, recipe: Recipe, run_dir: Path) -> None:
    """Start the trackers (main process only) with the recipe, flattened to dotted keys, as the config."""
    if not recipe.train.report_to:
        return
    if "wandb" in recipe.train.report_to and accelerator.is_main_process:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    # MLflow's tracker reads MLFLOW_EXPERIMENT_NAME itself; W&B's project would be this argument's.
    project = os.environ.get("WANDB_PROJECT") or PROJECT
    kwargs = {k: v for k, v in _init_kwargs(run_dir).items() if v}
    accelerator.init_trackers(project, config=flat_config(recipe), init_kwargs=kwargs)


def flat_config(recipe: Recipe) -> dict[str, Any]:
    """The recipe as ``{"train.lr": 0.0005, ...}``: scalars as they are, lists and mappings as JSON text
    (every tracker takes these; TensorBoard's hyperparameters take nothing else)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif value is None or isinstance(value, bool | int | float | str):
            flat[prefix] = "null" if value is None else value
        else:
            flat[prefix] = json.dumps(value)

    walk("", recipe.model_dump(mode="json"))
    return flat


def scalars(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of ``values`` under ``prefix/`` (what every tracker can plot)."""
    return {
        f"{prefix}/{k}": v
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step", "epoch")
    }


def log(accelerator: Any, values: dict[str, float], step: int) -> None:
    """Metrics at ``step`` to every tracker (Accelerate logs from the main process only)."""
    if accelerator.trackers:
        accelerator.log(values, step=step)


def log_final(accelerator: Any, metrics: dict[str, Any], step: int) -> None:
    """The run's best and final evaluations (``best/…``, ``final/…``), its throughput and training time."""
    values = {**scalars(metrics["best"], "best"), **scalars(metrics["final"], "final")}
    values["train/samples_per_second"] = metrics["train_samples_per_second"]
    values["train/seconds"] = metrics["train_seconds"]
    log(accelerator, values, step)


def close(accelerator: Any) -> None:
    """Finish the trackers (flushes TensorBoard's events, ends the MLflow or W&B run) without the process
    group teardown of ``end_training``: for a run that stopped on an error or a signal."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
