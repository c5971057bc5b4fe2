"""Running ``lorakit train`` as several processes: ``--num-processes N`` (or ``train.num_processes: N``)
re-launches the same command through Accelerate's launcher, exactly as

    accelerate launch --multi_gpu --num_processes N -m lorakit train RECIPE ...

would, and ``train.distributed: FILE`` passes ``--config_file FILE`` instead, so DeepSpeed, FSDP and
several machines work as Accelerate provides them. The launched processes see the launcher's variables
(``LOCAL_RANK``, ``WORLD_SIZE``, ...) and train; they never launch again.

On a machine without a GPU the processes run on the CPU and talk over gloo: Accelerate's ``--cpu`` flag
starts one process (it expects ``mpirun`` to start the others), so lorakit uses the torchrun-based
launcher and sets ``ACCELERATE_USE_CPU=true``, which makes each process a gloo CPU process.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

import torch

from lorakit.errors import UserError
from lorakit.recipe import Recipe
from lorakit.training.preflight import check_precision, inside_launched_process, run_dir_for

logger = logging.getLogger(__name__)


def needs_launch(recipe: Recipe) -> bool:
    """Whether ``lorakit train`` must re-launch itself: several processes, or an Accelerate config file,
    asked for and not already inside a launched process."""
    wanted = recipe.train.num_processes > 1 or recipe.train.distributed is not None
    return wanted and not inside_launched_process()


def launch_arguments(recipe: Recipe, train_argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` arguments that run ``lorakit <train_argv>``, and the environment
    variables to add. ``train_argv`` starts with ``train``."""
    t = recipe.train
    env: dict[str, str] = {}
    if t.distributed is not None:
        args = ["--config_file", str(t.distributed)]
        if t.num_processes > 1:  # the recipe's count wins over the file's; its default (1) does not
            args += ["--num_processes", str(t.num_processes)]
    else:
        n = t.num_processes
        args = ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1", "--dynamo_backend", "no"]
        # Port 0: a free port, so that runs side by side on one machine do not collide.
        args += ["--main_process_port", "0"]
        if torch.cuda.is_available():
            if torch.cuda.device_count() < n:
                raise UserError(
                    f"{n} processes asked for but only {torch.cuda.device_count()} CUDA devices are visible",
                    recipe.where("train.num_processes"),
                )
        else:
            env["ACCELERATE_USE_CPU"] = "true"
            if "OMP_NUM_THREADS" not in os.environ:
                # torchrun would give each process one thread; share the cores out instead.
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    args += ["--mixed_precision", t.mixed_precision, "-m", "lorakit", *train_argv]
    return args, env


def launch(recipe: Recipe, train_argv: Sequence[str], resume: bool) -> int:
    """Run ``lorakit <train_argv>`` under Accelerate's launcher; returns the exit status of the first
    process that failed (0 when all succeeded)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # Told once here rather than once by every process.
    run_dir_for(recipe, resume)
    check_precision(recipe, "cuda" if torch.cuda.is_available() else "cpu")
    args, env = launch_arguments(recipe, train_argv)
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"lorakit: {shown + ' ' if shown else ''}accelerate launch {shlex.join(args)}", file=sys.stderr)
    try:
        parsed = launch_command_parser().parse_args(args)
    except SystemExit as exc:  # argparse already said what is wrong
        return int(exc.code) if isinstance(exc.code, int) else 2
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # In this process rather than as `accelerate launch` in a subprocess: the launcher's errors
        # keep the failed process's exit status, which the command line would turn into 1.
        launch_command(parsed)
    except subprocess.CalledProcessError as exc:  # the one-process launcher
        return exc.returncode or 1
    except ValueError as exc:  # Accelerate's checks of the launch configuration
        where = recipe.where("train.distributed" if recipe.train.distributed else "train.num_processes")
        raise UserError(f"accelerate launch: {exc}", where) from None
    except ChildFailedError as exc:  # torchrun's: the earliest failure is the cause, the rest were stopped
        code = exc.get_first_failure()[1].exitcode
        return code if code > 0 else 1  # negative: killed by a signal
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return 0
